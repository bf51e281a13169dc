"""The running client: the nursery tree of DESIGN §1. Start reading at ``tree.py``."""
