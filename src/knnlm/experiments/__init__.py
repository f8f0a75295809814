"""The paper's analyses, composed from library pieces."""
