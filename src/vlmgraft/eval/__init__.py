"""Evaluation: `vlmgraft eval` and the functions behind it.

In-process API (the offline demo and notebooks call these directly):
    run_eval(model_dir, samples, tasks, out_dir, ...)                    vlmgraft.eval.runner
    evaluate_vqa / evaluate_grounding / evaluate_caption / evaluate_ablation(model, processor, samples, ...)
                                                                         vlmgraft.eval.tasks
    evaluate_parity(model, processor, llm, tokenizer, prompts)           vlmgraft.eval.parity
    match_answer / normalize_answer / choice_letter                      vlmgraft.eval.normalize
    grounding_scores(predicted_boxes, reference_boxes)                   vlmgraft.eval.boxes

Standard benchmarks through `vlmgraft serve` (NOT run here: they need the network for their data sets).
Both harnesses talk to any OpenAI-compatible chat endpoint; start the server first:

    vlmgraft serve qwen3-smvl-merged --port 8000 --served-model-name qwen3-smvl   # /v1/chat/completions

lmms-eval (pip install lmms-eval; its `openai_compatible` model adapter reads OPENAI_API_BASE/OPENAI_API_KEY):

    export OPENAI_API_BASE=http://127.0.0.1:8000/v1 OPENAI_API_KEY=EMPTY
    python -m lmms_eval --model openai_compatible \\
        --model_args model_version=qwen3-smvl,max_retries=1 \\
        --tasks mmbench_cn_dev,textvqa_val,chartqa --batch_size 1 --limit 200 \\
        --output_path lmms_eval_results/ --log_samples

VLMEvalKit (git clone https://github.com/open-compass/VLMEvalKit && pip install -e VLMEvalKit): its JSON config
system points the generic OpenAI-API wrapper (class GPT4V) at the server; save as vlmgraft_vlmeval.json:

    {"model": {"vlmgraft": {"class": "GPT4V", "model": "qwen3-smvl", "key": "EMPTY", "temperature": 0,
                            "api_base": "http://127.0.0.1:8000/v1/chat/completions", "img_detail": "low",
                            "retry": 3}},
     "data": {"MMBench_DEV_CN": {"class": "ImageMCQDataset", "dataset": "MMBench_DEV_CN"},
              "MMStar": {"class": "ImageMCQDataset", "dataset": "MMStar"}}}

    python VLMEvalKit/run.py --config vlmgraft_vlmeval.json --mode all --work-dir vlmeval_out

Judge-based scoring in either harness needs a judge model endpoint of its own; the multiple-choice and exact-match
benchmarks above do not.
"""
