"""LLM access: one client interface for policy and judge, over several backends."""
