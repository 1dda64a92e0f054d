"""Where a run folder keeps each stage: the one list that the demo, the report, eval and serve all read."""

# `chatforge demo`'s own steps, in order ("data" is `chatforge prepare`'s folder)
DEMO_STEPS = ("tokenizer", "data", "pretrain", "tasks", "copy", "sft", "rm", "classify", "eval")
# the demo's alignment part (demo_form.py), each step a folder under form/
FORM_STEPS = ("tasks", "sft", "pairs", "heldout_pairs", "rm", "ppo_iter1", "pairs_iter2", "rm_iter2", "ppo", "grpo",
              "dpo", "eval")
# the folders a training stage writes its metrics.jsonl into, whether the demo or a user's command made them
TRAINED = ("pretrain", "copy", "sft", "rm", "ppo", "dpo", "grpo", "classify")
# each chat model's name and the folder that holds it, in pipeline order; "base" is the pre-trained model
MODEL_FOLDERS = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo"}
# at most how many held-out task prompts an evaluation scores per model (a seeded sample when there are
# more); the demo has fewer, and all of them are scored
TASK_PROMPTS = 1000
