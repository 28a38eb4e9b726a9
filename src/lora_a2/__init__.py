"""LoRA-A2: federated LoRA fine-tuning with alternating freeze and adaptive rank selection.

Koo, Jang, Ok. "Towards Robust and Efficient Federated Low-Rank Adaptation with Heterogeneous
Clients", ACL 2025 (arXiv 2410.22815).
"""

__version__ = "0.1.0"
