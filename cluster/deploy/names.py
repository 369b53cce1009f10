"""Names both sides of the Serve application agree on: the import path Serve builds it from, its
deployments, the Ray namespace of its actors, and the head node's resource that pins actors there."""

IMPORT_PATH = "cluster.deploy.app:build"
ROUTER = "router"        # the gRPC router deployment (`cluster.deploy.router_server.RouterServer`)
DEPLOYMENT = "replica"   # the model replicas (`cluster.deploy.replica_server.ReplicaServer`)
NAMESPACE = "caravan"
# Ray gives the head node this resource; a tiny share of it pins an actor there.
HEAD_NODE = {"node:__internal_head__": 0.001}


def registry_name(app_name: str) -> str:
    return f"{app_name}-registry"
