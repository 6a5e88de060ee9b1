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

/// Writes `len` bytes of stream `seed` to `out`.
pub fn send(out: &mut impl std::io::Write, seed: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        fill_fast(seed, sent, &mut buf[..n]);
        out.write_all(&buf[..n])?;
        sent += n as u64;
    }
    Ok(())
}

/// Reads until EOF from `input`, checking every byte against stream `seed`.
/// Returns the number of bytes read, or where the first mismatch was.
pub fn receive(input: &mut impl std::io::Read, seed: u64) -> std::io::Result<Result<u64, u64>> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            return Ok(Ok(received));
        }
        if let Err(bad) = check(seed, received, &buf[..n]) {
            return Ok(Err(bad));
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
}
