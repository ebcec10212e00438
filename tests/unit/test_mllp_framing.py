"""MLLP framing on raw bytes: field cases BR-09 and BR-10, oversize, stray bytes."""

from __future__ import annotations

import pytest

from carebridge.ingest.hl7v2.mllp import FrameDecoder, FrameTooLarge

# BR-09: an ORU^R01 whose OBX-5 is long enough to span many TCP reads.
BR09_HEAD = (
    b"MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ORU^R01|CTL0009|P|2.5\r"
    b"PID|1||MRN0009^^^SENDFAC^MR||TESTPATIENT^IOTA\r"
    b"OBR|1||ACC0009|71045^CHEST XRAY 1 VIEW^CPT\r"
    b"OBX|1|TX|REPORT^Report text||"
)


def br09_message(text_length: int) -> bytes:
    return BR09_HEAD + b"A" * text_length + b"||||||F\r"


def frame(payload: bytes) -> bytes:
    return b"\x0b" + payload + b"\x1c\r"


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    """Feed ``chunks``; return (index of the chunk that completed it, payload)."""
    found = []
    for index, chunk in enumerate(chunks):
        found.extend((index, payload) for payload in decoder.feed(chunk))
    return found


def test_br09_one_byte_per_read() -> None:
    message = br09_message(70000)
    data = frame(message)
    decoder = FrameDecoder(max_frame_bytes=1 << 20)
    found = feed_all(decoder, [data[i : i + 1] for i in range(len(data))])
    assert found == [(len(data) - 1, message)]
    assert message.split(b"OBX|1|TX|REPORT^Report text||")[1].split(b"|")[0] == b"A" * 70000


@pytest.mark.parametrize("size", [1000, 65536])
def test_br09_fixed_chunks(size: int) -> None:
    message = br09_message(70000)
    data = frame(message)
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    found = feed_all(FrameDecoder(max_frame_bytes=1 << 20), chunks)
    assert found == [(len(chunks) - 1, message)]


def test_br09_split_between_end_block_and_cr() -> None:
    message = br09_message(70000)
    data = frame(message)
    decoder = FrameDecoder(max_frame_bytes=1 << 20)
    assert decoder.feed(data[:-1]) == []
    assert decoder.feed(data[-1:]) == [message]


def test_br09_every_split_point_of_a_short_message() -> None:
    message = br09_message(10)
    data = frame(message)
    for k in range(1, len(data)):
        decoder = FrameDecoder(max_frame_bytes=4096)
        first = decoder.feed(data[:k])
        second = decoder.feed(data[k:])
        assert first == [], k
        assert second == [message], k
        assert decoder.partial_bytes == 0
        assert decoder.stray_bytes == 0


def test_br09_unterminated_frame_yields_nothing() -> None:
    data = frame(br09_message(10))
    decoder = FrameDecoder(max_frame_bytes=4096)
    assert decoder.feed(data[:-1]) == []
    assert decoder.partial_bytes == len(data) - 2  # without 0x0B and 0x0D


BR10_A = (
    b"MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ADT^A04|CTL0010A|P|2.5\r"
    b"PID|1||MRN0010^^^SENDFAC^MR||TESTPATIENT^KAPPA\r"
)
BR10_B = BR10_A.replace(b"ADT^A04|CTL0010A", b"ADT^A08|CTL0010B")
BR10_C = BR10_A.replace(b"ADT^A04|CTL0010A", b"ADT^A08|CTL0010C")


def test_br10_three_frames_two_reads_filler_skipped() -> None:
    read1 = frame(BR10_A) + b"\x00\x00\r\n" + frame(BR10_B) + b"\x0b" + BR10_C[:20]
    read2 = BR10_C[20:] + b"\x1c\r"
    decoder = FrameDecoder(max_frame_bytes=4096)
    assert decoder.feed(read1) == [BR10_A, BR10_B]
    assert decoder.filler_bytes == 4
    assert decoder.stray_bytes == 0
    assert decoder.feed(read2) == [BR10_C]


def test_stray_bytes_and_broken_frame_are_counted() -> None:
    decoder = FrameDecoder(max_frame_bytes=4096)
    data = b"garbage" + b"\x0bMSH|partial" + frame(BR10_A)
    assert decoder.feed(data) == [BR10_A]
    assert decoder.stray_bytes == len(b"garbage")
    assert decoder.broken_frames == 1


def test_oversize_frame_raises_before_its_end_arrives() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    decoder.feed(b"\x0b" + b"A" * 1000)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"A" * 100)


def test_oversize_complete_frame_raises() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(FrameTooLarge):
        decoder.feed(frame(b"A" * 2000))


def test_frame_at_the_limit_passes() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    assert decoder.feed(frame(b"A" * 1024)) == [b"A" * 1024]
