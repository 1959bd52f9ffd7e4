"""Assemble BENCHMARKS.md from the fragments the benchmark scripts wrote in benchmarks/results/.

    python benchmarks/render.py
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
ORDER = ["contrastive_kd", "contrastive_ablation", "kd_step_cost", "demo", "synth_speed", "generative_memory", "demo_generative", "demo_reranker", "reranker_kd", "reranker_kd-long-students", "reranker_kd-strong-teacher", "reranker_kd-pruned", "reranker_kd-pruned-rerun", "reranker_kd-pruned-graded", "reranker_pruned_arch_alone", "reranker_kd-pruned-6k", "reranker_pruned_arch_alone-6k", "reranker_ablation", "reranker_ablation-long-students", "reranker_seed_agreement", "reranker_seed_agreement-pruned", "generative_kd", "generative_kd-strong-teacher", "generative_kd-long-students", "generative_ablation", "onnx_vs_eager", "serve_load", "serve_load-httpx", "serve_soak", "export_serve_notes", "repeated_captions", "teacher_store", "trl_compare", "stream_rss", "prefetch", "fsdp_memory", "compress", "moe_prune_heal", "pipeline", "pipeline_floor", "pipeline_notes", "qad", "cpu_int8", "cpu_int8_notes", "dual_students", "omni_kd", "omni_kd-long", "omni_kd-cosfeat", "omni_kd-cosw10", "omni_kd-centaudio", "omni_kd-centboth", "omni_expert_prune", "omni_kd_notes", "demo_omni"]

INTRO = """# Benchmarks

Every figure below comes from a script in `benchmarks/`, run on purpose (never in CI), on the
machine named under each table; re-run the command shown to reproduce it. Each script writes
`benchmarks/results/<name>.{md,json}`; `python benchmarks/render.py` assembles this page.
Ratios (retention, speed-up, step cost) are measured side by side in one run.

Setting shared by the contrastive tables: ShapesWorld generated with seed 0 and 10,000 images
(8,000 train pairs, 1,000 test pairs = the retrieval gallery), 64 px. Teacher: the shipped
`configs/contrastive/shapesworld-teacher.yaml` (CLIPModel, 3+3 layers, width 128) trained for
2,000 steps × 128. Students: CLIPModel with 2+2 layers, width 64 (20% of the teacher's parameters),
1,200 steps × 128, AdamW 1e-3, warm-up 50 + cosine; the no-KD baseline
(`shapesworld-student-baseline.yaml`) and the KD student (`shapesworld-student-kd.yaml`: CLIP loss +
similarity KD + FD × 100, teacher signals cached once) differ only in the loss. The demo
(`mmdistill demo`) uses the same recipes with shorter budgets (teacher 550, students 600 steps) to
stay under 10 minutes, so its figures are lower than these.
"""


def main() -> None:
    parts = [INTRO]
    for name in ORDER:
        f = RESULTS / f"{name}.md"
        if f.is_file():
            parts.append(f.read_text().strip() + "\n")
    notes = RESULTS / "NOTES.md"
    if notes.is_file():
        parts.append(notes.read_text().strip() + "\n")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
