"""Building blocks of the two-tower retriever: features, towers, FAISS indexes."""
