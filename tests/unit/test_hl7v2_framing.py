"""Tests for splitting HL7 v2 files into messages (raw bytes, no decoding)."""

from __future__ import annotations

from pathlib import Path

import pytest

import carebridge
from carebridge.ingest.hl7v2.framing import RawHl7, split_file

DATA = Path(carebridge.__file__).parent / "demo" / "data" / "hl7v2"
ALL_FILES = sorted(DATA.rglob("*.hl7"))

MSG_A = b"MSH|^~\\&|APP|FAC|RCV|RFAC|20240501120000||ADT^A04|CTL0010A|P|2.5\rPID|1||MRN0010\r"
MSG_B = b"MSH|^~\\&|APP|FAC|RCV|RFAC|20240501120000||ADT^A08|CTL0010B|P|2.5\rPID|1||MRN0010\r"


def _payloads(data: bytes) -> list[bytes]:
    return [m.payload for m in split_file(data).messages]


def test_single_message_is_returned_byte_for_byte() -> None:
    split = split_file(MSG_A)
    assert split.messages == [RawHl7(MSG_A, 0, ())]
    assert split.problems == []


@pytest.mark.parametrize("sep", [b"\r", b"\n", b"\r\n"])
def test_messages_split_with_any_line_end_and_blank_lines(sep: bytes) -> None:
    a = MSG_A.replace(b"\r", sep)
    b = MSG_B.replace(b"\r", sep)
    data = a + sep + sep + b + sep
    split = split_file(data)
    assert [m.payload for m in split.messages] == [a, b]
    assert [m.offset for m in split.messages] == [0, len(a) + 2 * len(sep)]
    assert split.problems == []


def test_mllp_frames_with_filler_between_them_are_unwrapped() -> None:
    # Pipelining senders put NUL and CRLF filler between frames.
    data = b"\x0b" + MSG_A + b"\x1c\r" + b"\x00\x00\r\n" + b"\x0b" + MSG_B + b"\x1c\r"
    split = split_file(data)
    assert [m.payload for m in split.messages] == [MSG_A, MSG_B]
    assert split.messages[1].offset == 1 + len(MSG_A) + 2 + 4 + 1
    assert split.problems == []


def test_junk_between_mllp_frames_is_a_problem_not_data() -> None:
    data = b"\x0b" + MSG_A + b"\x1c\rGARBAGE\x0b" + MSG_B + b"\x1c\r"
    split = split_file(data)
    assert _payloads(data) == [MSG_A, MSG_B]
    assert split.problems == [f"7 bytes outside MLLP frames at offset {len(MSG_A) + 3}"]


def test_unterminated_mllp_frame_is_dropped_and_reported() -> None:
    data = b"\x0b" + MSG_A + b"\x1c\r" + b"\x0b" + MSG_B
    split = split_file(data)
    assert _payloads(data) == [MSG_A]
    assert len(split.problems) == 1
    assert "not terminated" in split.problems[0]


def test_mllp_end_block_without_cr_is_a_warning() -> None:
    split = split_file(b"\x0b" + MSG_A + b"\x1c")
    assert split.messages[0].payload == MSG_A
    assert split.messages[0].warnings == ("MLLP end block 0x1C not followed by 0x0D",)


def test_bom_at_file_start_is_removed_and_offsets_stay_file_offsets() -> None:
    split = split_file(b"\xef\xbb\xbf" + MSG_A)
    assert split.messages == [RawHl7(MSG_A, 3, ("UTF-8 BOM removed",))]
    assert split.problems == []


def test_batch_envelope_segments_are_not_messages() -> None:
    data = (
        b"FHS|^~\\&|APP\rBHS|^~\\&|APP\r" + MSG_A + MSG_B + b"BTS|2\rFTS|1\r"
    )
    split = split_file(data)
    assert [m.payload for m in split.messages] == [MSG_A, MSG_B]
    assert split.problems == []


def test_batch_counts_that_do_not_match_are_problems() -> None:
    data = b"FHS|^~\\&|APP\rBHS|^~\\&|APP\r" + MSG_A + b"BTS|2\rFTS|3\r"
    split = split_file(data)
    assert split.problems == [
        "BTS-1 declares 2 messages, found 1",
        "FTS-1 declares 3 batches, found 1",
    ]
    assert len(split.messages) == 1


def test_missing_trailers_are_problems() -> None:
    split = split_file(b"FHS|^~\\&|APP\rBHS|^~\\&|APP\r" + MSG_A)
    assert split.problems == [
        "batch opened at offset 13 has no BTS",
        "file header at offset 0 has no FTS",
    ]


@pytest.mark.parametrize("data", [b"", b"\r\n\r\n", b"\xef\xbb\xbf", b"\x00 \n"])
def test_empty_file_is_a_problem(data: bytes) -> None:
    split = split_file(data)
    assert split.messages == []
    assert split.problems == ["empty file"]


def test_data_before_first_msh_is_reported_and_skipped() -> None:
    split = split_file(b"hello\r" + MSG_A)
    assert _payloads(b"hello\r" + MSG_A) == [MSG_A]
    assert split.problems == ["6 bytes before first MSH at offset 0"]


def test_msh_text_inside_a_field_does_not_start_a_message() -> None:
    data = b"MSH|^~\\&|A|B|C|D|1||ADT^A04|1|P|2.5\rNTE|1||see MSH|x\r"
    assert _payloads(data) == [data]


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_every_bundled_file_splits_without_exception(path: Path) -> None:
    split = split_file(path.read_bytes())
    if path.name in {"sample_bad_batch1.hl7", "sample_bad_file.hl7"}:
        assert split.problems
    else:
        assert split.problems == []
        assert split.messages
    for message in split.messages:
        assert message.payload.startswith(b"MSH")


def test_python_hl7_sample_file_has_three_messages_in_two_batches() -> None:
    split = split_file((DATA / "hl7v2-python-hl7" / "sample_file1.hl7").read_bytes())
    assert [m.offset for m in split.messages] == [132, 412, 763]
    assert all(m.payload.endswith(b"PV1|1|O||||^^^^^1\r") for m in split.messages)


def test_python_hl7_bad_files_report_the_envelope_faults() -> None:
    bad_batch = split_file((DATA / "hl7v2-python-hl7" / "sample_bad_batch1.hl7").read_bytes())
    assert len(bad_batch.messages) == 1
    assert bad_batch.problems == [
        "BHS at offset 183 opens a batch before BTS closed the batch at offset 0",
        "162 bytes outside any message at offset 248",
        "BTS-1 declares 1 messages, found 0",
    ]
    bad_file = split_file((DATA / "hl7v2-python-hl7" / "sample_bad_file.hl7").read_bytes())
    assert bad_file.messages == []
    assert "no MSH segment found" in bad_file.problems


def test_microsoft_bom_file_and_node_two_message_file() -> None:
    bom = split_file((DATA / "hl7v2-microsoft-fhir-converter" / "ADT04-23.hl7").read_bytes())
    assert len(bom.messages) == 1
    assert bom.messages[0].offset == 3
    assert bom.messages[0].warnings == ("UTF-8 BOM removed",)
    dft = split_file((DATA / "hl7v2-node-hl7-complete" / "mieweb_dft-example.hl7").read_bytes())
    assert [m.offset for m in dft.messages] == [0, 686]
    assert dft.messages[0].payload.endswith(b"|D\n")
