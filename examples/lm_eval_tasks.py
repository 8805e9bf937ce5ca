"""Write three small lm-evaluation-harness tasks over the corpus this package ships, for a toy checkpoint:

- ``mythos_cloze`` (multiple choice, loglikelihood): the first half of a corpus sentence, then which of three words
  comes next (the true one and two other words of the corpus); metric ``acc``.
- ``mythos_next_word`` (greedy generation): the same prefixes; the model writes until a space or punctuation, and
  ``exact_match`` compares that with the true next word.
- ``mythos_corpus`` (rolling loglikelihood): each paragraph of the corpus; metrics ``bits_per_byte``,
  ``byte_perplexity``, ``word_perplexity``. A toy checkpoint trained on this corpus is scored on text it saw: this
  measures fit, and shows small effects of depth that the two 24-question tasks are too coarse to show.

    python examples/lm_eval_tasks.py --output-dir runs/lm_eval_tasks
    lm_eval --model hf --model_args pretrained=runs/hub,trust_remote_code=True,n_loops=8 \\
        --tasks mythos_cloze,mythos_next_word,mythos_corpus --include_path runs/lm_eval_tasks --device cpu

Each task is a YAML file over a JSON file beside it; docs/evaluation.md shows a depth sweep over them.
"""

import argparse
import json
import re
from pathlib import Path

from openmythos.training.data import SAMPLE_CORPUS

STOP = [" ", ".", ",", "\n"]  # a generated word ends at the first of these
CLOZE_TASK = """task: mythos_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
NEXT_WORD_TASK = """task: mythos_next_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: {stop}
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
"""
CORPUS_TASK = """task: mythos_corpus
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
  - metric: word_perplexity
"""


def corpus_docs(limit: int = 24) -> tuple[list[dict], list[dict]]:
    """(cloze docs, next-word docs) from the first ``limit`` sentences of the shipped corpus, deterministically."""
    text = Path(SAMPLE_CORPUS).read_text()
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6][:limit]
    vocabulary = sorted({w.strip(".,;:!?\"'") for s in sentences for w in s} - {""})
    cloze, next_word = [], []
    for i, words in enumerate(sentences):
        cut = len(words) // 2
        context, answer = " ".join(words[:cut]), words[cut].strip(".,;:!?\"'")
        distractors = [w for w in (vocabulary[(i * 7 + k * 13) % len(vocabulary)] for k in range(1, 40))
                       if w != answer][:2]
        choices = distractors[:]
        choices.insert(i % 3, answer)  # the gold answer moves between the three places
        cloze.append({"context": context, "choices": choices, "answer": i % 3})
        next_word.append({"prompt": context + " ", "target": answer})
    return cloze, next_word


def paragraph_docs() -> list[dict]:
    return [{"text": p.strip()} for p in Path(SAMPLE_CORPUS).read_text().split("\n\n") if p.strip()]


def write_tasks(folder: Path, cloze_docs: list[dict], next_word_docs: list[dict], max_gen_toks: int = 16,
                paragraphs: list[dict] | None = None) -> Path:
    """Write the tasks' YAML files and their JSON data into ``folder`` (for ``lm_eval --include_path folder``);
    ``mythos_corpus`` only when ``paragraphs`` are given."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if paragraphs is not None:
        (folder / "corpus.json").write_text(json.dumps(paragraphs, indent=1))
        (folder / "mythos_corpus.yaml").write_text(CORPUS_TASK.format(data=folder / "corpus.json"))
    (folder / "cloze.json").write_text(json.dumps(cloze_docs, indent=1))
    (folder / "next_word.json").write_text(json.dumps(next_word_docs, indent=1))
    (folder / "mythos_cloze.yaml").write_text(CLOZE_TASK.format(data=folder / "cloze.json"))
    (folder / "mythos_next_word.yaml").write_text(
        NEXT_WORD_TASK.format(data=folder / "next_word.json", stop=json.dumps(STOP), max_gen_toks=max_gen_toks))
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/lm_eval_tasks", help="folder for the YAML and JSON files")
    parser.add_argument("--limit", type=int, default=24, help="how many corpus sentences to use")
    args = parser.parse_args(argv)
    cloze, next_word = corpus_docs(args.limit)
    paragraphs = paragraph_docs()
    folder = write_tasks(args.output_dir, cloze, next_word, paragraphs=paragraphs)
    print(json.dumps({"folder": str(folder), "cloze": len(cloze), "next_word": len(next_word),
                      "corpus": len(paragraphs)}))


if __name__ == "__main__":
    main()
