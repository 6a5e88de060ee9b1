//! A reproducible byte stream: any offset of stream `seed` can be generated and
//! checked independently, so integrity checks need no stored copy.

/// The 8 bytes of stream `seed` at word `word` (splitmix64).
fn word(seed: u64, word: u64) -> [u8; 8] {
    let mut z = seed ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Fills `buf` with the bytes of stream `seed` starting at `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let position = offset + i as u64;
        *byte = word(seed, position / 8)[(position % 8) as usize];
    }
}

/// Fast path of [`fill`] for word-aligned offsets.
pub fn fill_fast(seed: u64, offset: u64, buf: &mut [u8]) {
    if !offset.is_multiple_of(8) {
        return fill(seed, offset, buf);
    }
    let mut chunks = buf.chunks_exact_mut(8);
    let mut index = offset / 8;
    for chunk in &mut chunks {
        chunk.copy_from_slice(&word(seed, index));
        index += 1;
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let last = word(seed, index);
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// Checks `buf` against stream `seed` at `offset`; returns the first bad offset.
pub fn check(seed: u64, offset: u64, buf: &[u8]) -> Result<(), u64> {
    let mut expected = vec![0u8; buf.len()];
    fill_fast(seed, offset, &mut expected);
    match buf.iter().zip(&expected).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(offset + i as u64),
    }
}

/// How far around a corrupt offset [`explain`] looks for the bytes found there.
const EXPLAIN_WINDOW: u64 = 64 << 20;

/// Describes a corruption found by [`check`] at `bad` in `chunk` (stream bytes
/// from `chunk_offset` on): where in the stream the bytes found at `bad` really
/// come from, and for how long — "duplicate", "skipped" and "zeros" tell the
/// kernel bugs apart.
pub fn explain(seed: u64, chunk_offset: u64, chunk: &[u8], bad: u64) -> String {
    let start = (bad - chunk_offset) as usize;
    let found = &chunk[start..];
    let probe = &found[..found.len().min(32)];
    if probe.len() < 8 {
        return format!("corrupt byte at offset {bad} (too few bytes to locate)");
    }
    if probe.iter().all(|&b| b == 0) {
        let zeros = found.iter().take_while(|&&b| b == 0).count();
        return format!("corrupt byte at offset {bad}: {zeros} zero bytes");
    }
    let from = bad.saturating_sub(EXPLAIN_WINDOW);
    let mut window = vec![0u8; (bad + EXPLAIN_WINDOW - from) as usize];
    fill_fast(seed, from, &mut window);
    let Some(at) = window.windows(probe.len()).position(|w| w == probe) else {
        return format!(
            "corrupt byte at offset {bad}: the bytes there are not from the stream within {} MiB",
            EXPLAIN_WINDOW >> 20
        );
    };
    let source = from + at as u64;
    let run = found
        .iter()
        .zip(&window[at..])
        .take_while(|(a, b)| a == b)
        .count();
    let shift = source as i64 - bad as i64;
    let kind = if shift < 0 {
        "a duplicate of earlier bytes"
    } else {
        "bytes from later in the stream (some skipped)"
    };
    format!(
        "corrupt byte at offset {bad}: the next {run}{} bytes are stream bytes {source}.. ({kind}, shift {shift})",
        if start + run == chunk.len() { "+" } else { "" },
    )
}

/// Writes `len` bytes of stream `seed` to `out`.
pub fn send(out: &mut impl std::io::Write, seed: u64, len: u64) -> std::io::Result<()> {
    send_range(out, seed, 0, len)
}

/// Writes bytes `from..to` of stream `seed` to `out`.
pub fn send_range(
    out: &mut impl std::io::Write,
    seed: u64,
    from: u64,
    to: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = from;
    while at < to {
        let n = (to - at).min(buf.len() as u64) as usize;
        fill_fast(seed, at, &mut buf[..n]);
        out.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Reads until EOF from `input`, checking every byte against stream `seed`.
/// Returns the number of bytes read, or where the first mismatch was.
pub fn receive(input: &mut impl std::io::Read, seed: u64) -> std::io::Result<Result<u64, u64>> {
    Ok(receive_from(input, seed, 0, None)?.map_err(|(bad, _)| bad))
}

/// [`receive`] as one result: the byte count, or what went wrong — an I/O
/// error, or the mismatch [`explain`]ed.
pub fn receive_checked(input: &mut impl std::io::Read, seed: u64) -> Result<u64, String> {
    receive_range(input, seed, 0, None)
}

/// Reads stream `seed` from offset `from`, checking every byte, until EOF or
/// until `limit` bytes were read; returns how many were, or what went wrong
/// as [`receive_checked`] does.
pub fn receive_range(
    input: &mut impl std::io::Read,
    seed: u64,
    from: u64,
    limit: Option<u64>,
) -> Result<u64, String> {
    match receive_from(input, seed, from, limit) {
        Ok(Ok(n)) => Ok(n),
        Ok(Err((_, explained))) => Err(explained),
        Err(err) => Err(err.to_string()),
    }
}

/// The reading loop of the `receive` functions: the byte count, or the first
/// mismatch's offset with its [`explain`]ation.
fn receive_from(
    input: &mut impl std::io::Read,
    seed: u64,
    from: u64,
    limit: Option<u64>,
) -> std::io::Result<Result<u64, (u64, String)>> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        let want = limit.map_or(buf.len() as u64, |limit| {
            (limit - received).min(buf.len() as u64)
        }) as usize;
        if want == 0 {
            return Ok(Ok(received));
        }
        let n = input.read(&mut buf[..want])?;
        if n == 0 {
            return Ok(Ok(received));
        }
        let offset = from + received;
        if let Err(bad) = check(seed, offset, &buf[..n]) {
            return Ok(Err((bad, explain(seed, offset, &buf[..n], bad))));
        }
        received += n as u64;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_and_slow_fill_agree() {
        let mut a = vec![0u8; 1000];
        let mut b = vec![0u8; 1000];
        super::fill(7, 3, &mut a);
        super::fill_fast(7, 3, &mut b);
        assert_eq!(a, b);
        super::fill(7, 16, &mut a);
        super::fill_fast(7, 16, &mut b);
        assert_eq!(a, b);
        assert_eq!(super::check(7, 16, &a), Ok(()));
        a[10] ^= 1;
        assert_eq!(super::check(7, 16, &a), Err(26));
    }

    #[test]
    fn explain_names_a_duplicate() {
        let mut stream = vec![0u8; 4096];
        super::fill(3, 0, &mut stream);
        // Bytes 1000..1500 arrive twice.
        let mut received = stream[..1500].to_vec();
        received.extend_from_slice(&stream[1000..]);
        let bad = super::check(3, 0, &received).unwrap_err();
        assert_eq!(bad, 1500);
        let text = super::explain(3, 0, &received, bad);
        assert!(text.contains("stream bytes 1000.."), "{text}");
        assert!(text.contains("shift -500"), "{text}");
    }
}
