"""FAISS indexes over the knowledge base and image-text case pairs."""
