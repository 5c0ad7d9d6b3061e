"""rwkvlab.worker: cutting a worker's stderr into bar states and lines for a person."""
from __future__ import annotations

from rwkvlab.worker import clean, human, last_words, split_pieces


def test_escapes_and_redraws_end_pieces_and_leave_nothing_behind():
    bar = "bench:  20%|██        | 2/10 [00:00<00:01, 8.00step/s]"
    text = f"\r{bar}\n\r{bar}\x1b[Asome warning\n\r\x1b[2K\x07\r"
    assert [line for line in map(human, split_pieces(text)) if line] == ["some warning"]
    assert clean("\x1b") == clean("\x1b[1;") == "" and human(f"  {bar}  ") == ""


def test_a_read_cut_inside_an_escape_keeps_it_for_the_next_read():
    pieces: list[str] = []
    pending = ""
    for chunk in ("first line\n\x1b", "[Asecond\x1b[", "2Kthird\r"):
        *done, pending = split_pieces(pending + chunk)
        pieces += done
    pieces.append(pending)
    assert [p for p in map(human, pieces) if p] == ["first line", "second", "third"]


def test_last_words_prefer_benchs_own_error_line():
    assert last_words(["rwkvlab bench: no adapter", "  detail"]) == "rwkvlab bench: no adapter"
    assert last_words(["a", "b"]) == "b" and last_words([]) == "no message"
