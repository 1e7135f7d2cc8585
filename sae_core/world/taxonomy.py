"""The world's taxonomy: family > shape > colour group > colour, named like iNaturalist's folders.

iNaturalist 2021 names each class folder `00000_Animalia_Chordata_..._species`; the hierarchy
analysis reads a path from such a name. Each world leaf gets the same kind of name,
`00000_round_circle_warm_red`, so the analysis runs unchanged on both.
"""
from __future__ import annotations

from .generator import COLOUR_GROUPS, SHAPE_FAMILIES, WorldSpec, main_object

LEVELS = ("family", "shape", "colour_group", "colour")


def leaf_name(index: int, path) -> str:
    return f"{index:05d}_" + "_".join(path)


def build_taxonomy(spec: WorldSpec) -> dict:
    """taxonomy.json: the levels, every leaf (id, folder-style name, path, held-out flag) and the tree."""
    leaves, tree = [], {"name": "world", "children": []}
    for family, shapes in SHAPE_FAMILIES.items():
        fam_node = {"name": family, "children": []}
        tree["children"].append(fam_node)
        for shape in shapes:
            shape_node = {"name": shape, "children": []}
            fam_node["children"].append(shape_node)
            for group, colours in COLOUR_GROUPS.items():
                group_node = {"name": group, "children": []}
                shape_node["children"].append(group_node)
                for colour in colours:
                    path = [family, shape, group, colour]
                    leaf = {"id": len(leaves), "name": leaf_name(len(leaves), path), "path": path,
                            "held_out": shape == spec.ood_shape or colour == spec.ood_colour}
                    leaves.append(leaf)
                    group_node["children"].append({"name": colour, "leaf": leaf["id"]})
    return {"levels": list(LEVELS), "root": "world", "leaves": leaves, "tree": tree,
            "path_of_image": "the object the image is about: the only one, else the larger visible one"}


def taxonomy_path(factors: dict, masks=None) -> list:
    """Root-to-leaf names for an image (see `main_object`)."""
    obj = factors["objects"][main_object(factors, masks)]
    return [obj[level] for level in LEVELS]
