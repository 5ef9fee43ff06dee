"""Paged optimizers on the C++/CUDA extension (see DESIGN.md, "Paged optimizers")."""
