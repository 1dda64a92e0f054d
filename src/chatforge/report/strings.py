"""Every word of the results table, one table per language, worded like README.md and README.zh-CN.md.

Each entry is a `str.format` template; report/summary.py and report/summary_form.py fill in the numbers. To
add a language, copy EN, translate the values and add it to TEXT (the keys stay the same).
"""

from __future__ import annotations

EN = {
    "lang": "en",
    # punctuation: Chinese text takes full-width separators and no space before a parenthesis
    "sep": "; ", "comma": ", ", "paren": " ({})", "seconds": "{} s", "same": "(same)",
    "chance": "chance {}", "chance_50": "chance 50%", "base_model": "base model",
    "labels": {"tokenizer": "tokenizer", "prepare": "prepare", "pretrain": "pretrain", "copy": "copy", "sft": "SFT",
               "rm": "reward model", "ppo": "PPO", "grpo": "GRPO", "dpo": "DPO", "classify": "classify",
               "eval": "eval", "energy": "energy"},
    "lang_named": " (English {}, Chinese {})", "lang_pair": " ({} / {})",
    # tokenizer and prepare
    "tokenizer_what": "byte-level BPE, {vocab} tokens, on {mb:.1f} MB", "bytes_per_token": "{} bytes/token",
    "tokenizer_base": "1 byte/token (raw bytes)",
    "prepare_what": "{train:,} train / {val:,} val documents (split by document hash)",
    "prepare_result": "{} / {} tokens",
    # pretrain
    "params": "{:.1f} M params", "style": "{} style", "steps": "{steps} steps × {tokens:,} tokens",
    "pretrain_what": "val bits per byte", "nats": "{} nats/token", "unigram": "unigram {} bpb",
    # copy and SFT
    "copy_what": "copy phase: \"Repeat this line\", held-out lines never trained on (half English, half Chinese), "
                 "repeated exactly",
    "copy_base": "the base model has no induction head (scripts/induction_probe.py)",
    "sft_end": "replies that end with `<|im_end|>` within 48 tokens, {n}held-out prompts",
    "sft_success": "constraint success (checker), {n}held-out prompts", "all_en_zh": ": all / English / Chinese",
    # reward model
    "rm_what": "pairwise accuracy (chosen scored above rejected){pairs}, from the SFT model",
    "rm_pairs": ", {:,} held-out pairs",
    # PPO, GRPO, DPO on the first task
    "ppo_what": "constraint success, {n}held-out prompts (greedy); KL to SFT of sampled replies",
    "ppo_kl": "; KL {} nats/reply",
    "ppo_reward": "reward-model score of its sampled replies on each round's fresh prompts, first round → last five "
                  "logged steps",
    "by_language": "constraint success by language: English / Chinese",
    "grpo_what": "constraint success, {n}held-out prompts (greedy); KL to SFT",
    "dpo_what": "held-out implicit-reward accuracy (chosen above rejected){pairs}; constraint success",
    "dpo_pairs": ", {:,} pairs", "dpo_base": "0% at the start (policy = reference); SFT {}",
    # classify
    "classify_what": "which source is a line from{classes}{lines}", "classes": " ({} classes)",
    "lines": ", {:,} held-out lines", "majority": "majority class {}",
    # eval
    "bpb_what": "bits per byte of every model on the val documents (first 32,768 tokens)",
    "bpb_base": "fine-tuning trades corpus fit for chat: the alignment tax",
    "choice_what": "which word has this WordNet gloss (4 choices, by log-likelihood){n}", "questions": ", {} questions",
    "win_what": "reward model prefers the model's reply to SFT's, same held-out prompts",
    "win_base": "SFT itself 50% (a tie)",
    "auc_what": "reward model tells each model's own held-out replies apart: P(a success outscores a failure), AUC",
    "auc_base": "blind 50%",
    "harms_what": "harms probe, {} prompts: replies with a lexicon term (LDNOOBW); refusal rate where a refusal is due",
    "harms_base": "no refusal data in the demo: 0% is expected",
    # energy
    "energy_what": "energy and CO2 of every stage ({source}; grid {grid:g} g/kWh{world})",
    "estimate": r"estimate: \1 W/core × \2 cores",  # energy.json's power source, in this language
    "world_average": ", the world average", "kettle": "boiling a litre of water: about 93 Wh",
    "machine": "the machine every number above comes from, and the precision `train.precision = \"auto\"` picked "
               "there (the alignment part's configs ask for fp32)",
    "machine_other": "another CPU or precision: other numbers (docs/testing.md)",
    # the alignment part (report/summary_form.py)
    "form_sft": "verse in a form, {n} held-out prompts: SFT on {d} demonstrations, greedy gold success / "
                "pass@8 at T = 1 (headroom for RL)",
    "form_rm": "reward model fitted to the judge's comparisons of the SFT model's own samples (time: the "
               "comparisons and the fit): AUC on its samples to held-out prompts (good vs bad); pairwise accuracy on "
               "held-out comparisons; after PPO's refresh, the refreshed reward model's AUC on the same samples",
    "form_ppo": "PPO against the reward model (never the judge), two iterations, the reward model refreshed "
                "on the judge's comparisons of iteration 1's samples (time: both iterations and the refresh): "
                "gold success, greedy (English / Chinese); sampled at T = 1; KL to SFT",
    "form_ppo_iter1": "PPO, iteration 1 alone (against the first reward model): gold success, greedy "
                      "(English / Chinese); sampled at T = 1; KL to SFT",
    "form_grpo": "GRPO against the judge itself: gold success, greedy (English / Chinese); sampled at T = 1; "
                 "KL to SFT",
    "form_dpo": "DPO on the comparisons: gold success, greedy (English / Chinese); sampled at T = 1",
    "form_bon": "best-of-16 samples of the SFT model, picked by the reward model: gold success; KL",
    "sampled": "sampled", "refreshed": "refreshed", "headroom_aim": "aim: headroom ≥ 15 points",
}

ZH = {
    "lang": "zh",
    "sep": ";", "comma": ",", "paren": "({})", "seconds": "{} 秒", "same": "(同上)",
    "chance": "随机 {}", "chance_50": "随机 50%", "base_model": "基座模型",
    "labels": {"tokenizer": "分词器", "prepare": "数据准备", "pretrain": "预训练", "copy": "复制", "sft": "SFT",
               "rm": "奖励模型", "ppo": "PPO", "grpo": "GRPO", "dpo": "DPO", "classify": "分类", "eval": "评测",
               "energy": "能耗"},
    "lang_named": "(英文 {},中文 {})", "lang_pair": "({} / {})",
    "tokenizer_what": "字节级 BPE,{vocab} 个词元,训练于 {mb:.1f} MB 文本", "bytes_per_token": "{} 字节/词元",
    "tokenizer_base": "1 字节/词元(原始字节)",
    "prepare_what": "训练 {train:,} / 验证 {val:,} 篇文档(按文档哈希划分)", "prepare_result": "{} / {} 词元",
    "params": "{:.1f} M 参数", "style": "{} 风格", "steps": "{steps} 步 × {tokens:,} 词元",
    "pretrain_what": "验证集每字节比特数", "nats": "{} nats/词元", "unigram": "一元模型 {} bpb",
    "copy_what": "复制阶段:“重复这句诗”,从未训练过的留出诗句(英文、中文各半)被逐字重复的比例",
    "copy_base": "基座模型没有归纳头(scripts/induction_probe.py)",
    "sft_end": "48 个词元内以 `<|im_end|>` 结束的回复,{n}条留出提示",
    "sft_success": "约束满足率(程序判定),{n}条留出提示", "all_en_zh": ":全部 / 英文 / 中文",
    "rm_what": "成对准确率(chosen 得分高于 rejected){pairs},从 SFT 模型出发", "rm_pairs": ",{:,} 个留出偏好对",
    "ppo_what": "约束满足率,{n}条留出提示(贪心解码);采样回复对 SFT 的 KL", "ppo_kl": ";KL {} nats/回复",
    "ppo_reward": "每轮新提示上采样回复的奖励模型得分,第一轮 → 最后五个记录步",
    "by_language": "按语言的约束满足率:英文 / 中文",
    "grpo_what": "约束满足率,{n}条留出提示(贪心解码);对 SFT 的 KL",
    "dpo_what": "留出集隐式奖励准确率(chosen 高于 rejected){pairs};约束满足率", "dpo_pairs": ",{:,} 对",
    "dpo_base": "开始时为 0%(策略 = 参考模型);SFT {}",
    "classify_what": "判断诗句出处{classes}{lines}", "classes": "({} 类)", "lines": ",{:,} 条留出诗句",
    "majority": "多数类 {}",
    "bpb_what": "每个模型在验证集文档上的每字节比特数(前 32,768 个词元)", "bpb_base": "对齐让模型忘掉一部分语料",
    "choice_what": "WordNet 释义选词(4 选 1,按对数似然){n}", "questions": ",{} 题",
    "win_what": "奖励模型判定胜过 SFT 回复的比例(同一批留出提示)", "win_base": "SFT 50%(平局)",
    "auc_what": "奖励模型能否分辨该模型自己的留出回复:成功者得分高于失败者的概率(AUC)", "auc_base": "看不出 50%",
    "harms_what": "有害探针,{} 条提示:含词表脏词的回复比例;应拒绝时的拒绝率",
    "harms_base": "玩具模型没有拒绝训练数据",
    "energy_what": "全部阶段的电能与 CO2({source},电网 {grid:g} g/kWh{world})", "world_average": "",
    "estimate": r"估算:每核 \1 W × \2 核",
    "kettle": "烧开一升水约 93 Wh",
    "machine": "得出以上数字的机器；`train.precision = \"auto\"` 在其上选定的精度（对齐部分的配置固定为 fp32）",
    "machine_other": "另一种 CPU 或精度：数字不同，见 docs/testing.md",
    "form_sft": "按格式写诗句,{n} 条留出提示:用 {d} 条示范做 SFT,贪心解码的金标准成功率 / T = 1 的 pass@8"
                "(留给 RL 的空间)",
    "form_rm": "在评判程序对 SFT 模型自身采样的比较上训练的奖励模型(时间含采样比较与训练):"
               "对留出提示采样回复的 AUC(好 vs 坏);留出比较对的成对准确率;PPO 更新后的奖励模型对同样采样的 AUC",
    "form_ppo": "PPO 对奖励模型优化(从不看评判程序),两轮迭代:第二轮前用评判程序对第一轮策略采样的比较"
                "更新奖励模型(时间含两轮与更新):金标准成功率,贪心(英文 / 中文);T = 1 采样;对 SFT 的 KL",
    "form_ppo_iter1": "只看 PPO 第一轮(对最初的奖励模型):金标准成功率,贪心(英文 / 中文);T = 1 采样;对 SFT 的 KL",
    "form_grpo": "GRPO 直接对评判程序优化:金标准成功率,贪心(英文 / 中文);T = 1 采样;对 SFT 的 KL",
    "form_dpo": "在这些比较对上做 DPO:金标准成功率,贪心(英文 / 中文);T = 1 采样",
    "form_bon": "SFT 模型的 16 个采样中由奖励模型选最好的:金标准成功率;KL",
    "sampled": "采样", "refreshed": "更新后", "headroom_aim": "目标:空间 ≥ 15 个百分点",
}

TEXT = {"en": EN, "zh": ZH}
assert all(set(table) == set(EN) for table in TEXT.values()), "every language has every entry"
