"""A small application used by the behaviour tests: models and the seed's routers."""
