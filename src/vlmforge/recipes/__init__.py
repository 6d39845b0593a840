"""Recipes: whole flows built from the library's parts. The tiny backbones made from scratch
(`tiny`), the demo (`demo`) and the design ablations (`ablate`)."""
