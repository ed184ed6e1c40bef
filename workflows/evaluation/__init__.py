"""``alignserve eval``: what each guidance and search buys (reward) against what it costs (KL to the base).

Modules, in the order the command uses them:

- ``configs``: one evaluated configuration (name, curve label, strength, request extension)
  and the JSON config file;
- ``sweep``: the usual sweep built from guide-model names (``--qsharp MODEL --strengths ...``);
- ``runner``: the requests, through a running server's OpenAI endpoints, with fixed seeds;
- ``metrics``: pass@1, maj@k, KL per completion and per token (reported or estimated);
- ``equal_kl``: with KL budgets, pass@1 at equal KL, each method's frontier and the budget check;
- ``reports``: results.csv, results.md, results.json, samples.jsonl;
- ``plot``: reward_vs_kl.png, reward_kl_frontier.png, pass_vs_compute.png;
- ``pipeline``: all of the above for a list of configurations, writing results as they finish.
"""
