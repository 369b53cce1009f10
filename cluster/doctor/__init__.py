"""`caravan doctor`: checks of a Ray cluster before it serves (capacity, links, environment)."""
