"""GASP objectives (InfoNCE both ways, soft-argmax depth) and matching metrics. Imports only torch."""
