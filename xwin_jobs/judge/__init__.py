"""The LLM judge: versioned prompt templates, a strict verdict parser, position-swap
aggregation, a judgment cache in the artifact store, cost accounting with a budget, and two
ways of asking (online async client, OpenAI Batch API).

Pure modules: templates, verdict, aggregate, cost. I/O shells: cache (the store), client
(online), batch (Batch API). `openai` is imported lazily by the shells only, so importing
this package stays light.
"""
