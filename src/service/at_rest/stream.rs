//! The encrypted file format, a STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015)
//! over ChaCha20-Poly1305, so files of any size are written and read chunk by chunk:
//!
//! ```text
//! header  = "HAFENENC" (8 bytes) | format version (1 byte) | random nonce prefix (7 bytes)
//! chunk i = ChaCha20-Poly1305(key, nonce = prefix | i as u32 big-endian | last flag (1 byte),
//!                              aad = header, plaintext of CHUNK bytes, the last one 0..=CHUNK)
//! ```
//!
//! Every chunk but the last holds exactly [`CHUNK`] bytes of plaintext. The counter in the
//! nonce makes reordered or repeated chunks fail to decrypt, the last-chunk flag makes a file cut
//! at a chunk boundary fail (its new last chunk was sealed as "not last") and so does anything
//! appended after the real last chunk; the header is authenticated with every chunk. A reader
//! therefore returns the exact plaintext or an error, never something else.

use std::io::{self, BufRead, Read, Write};

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    ChaCha20Poly1305, Key, Nonce,
};
use rand::RngCore;

use super::SecretKey;

pub const MAGIC: &[u8; 8] = b"HAFENENC";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
/// Authentication tag per chunk.
pub const TAG: usize = 16;
/// A sealed full chunk.
pub const SEALED_CHUNK: usize = CHUNK + TAG;
const PREFIX_LEN: usize = 7;

fn damaged(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("encrypted data damaged: {what}"),
    )
}

fn nonce(header: &[u8; HEADER_LEN], counter: u32, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..PREFIX_LEN].copy_from_slice(&header[9..HEADER_LEN]);
    n[PREFIX_LEN..PREFIX_LEN + 4].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n
}

fn cipher(key: &SecretKey) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(key.bytes()))
}

/// Whether `bytes` begin with the header of an encrypted file.
pub fn is_encrypted(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN && &bytes[..8] == MAGIC
}

/// The writing side: seals chunk after chunk under one random nonce prefix.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    header: [u8; HEADER_LEN],
    counter: u32,
    finished: bool,
}

impl Sealer {
    pub fn new(key: &SecretKey) -> Sealer {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8] = FORMAT_VERSION;
        rand::thread_rng().fill_bytes(&mut header[9..]);
        Sealer {
            cipher: cipher(key),
            header,
            counter: 0,
            finished: false,
        }
    }

    /// The file header: written before the first chunk.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Seal the next chunk: exactly [`CHUNK`] bytes unless `last`.
    pub fn seal(&mut self, plain: &[u8], last: bool) -> io::Result<Vec<u8>> {
        if self.finished || plain.len() > CHUNK || (!last && plain.len() != CHUNK) {
            return Err(io::Error::other("chunk sealed out of order"));
        }
        let n = nonce(&self.header, self.counter, last);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&n),
                Payload {
                    msg: plain,
                    aad: &self.header,
                },
            )
            .map_err(|_| io::Error::other("encryption failed"))?;
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("file too large to encrypt"))?;
        self.finished = last;
        Ok(sealed)
    }
}

/// The reading side: opens chunk after chunk, in order.
pub struct Opener {
    cipher: ChaCha20Poly1305,
    header: [u8; HEADER_LEN],
    counter: u32,
    finished: bool,
}

impl Opener {
    /// Check the header (magic and format version) and prepare to open its chunks.
    pub fn new(key: &SecretKey, header: &[u8]) -> io::Result<Opener> {
        if !is_encrypted(header) {
            return Err(damaged("no header"));
        }
        if header[8] != FORMAT_VERSION {
            return Err(damaged(format!(
                "format version {} is not known to this version of Hafen",
                header[8]
            )));
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&header[..HEADER_LEN]);
        Ok(Opener {
            cipher: cipher(key),
            header: h,
            counter: 0,
            finished: false,
        })
    }

    /// Open the next sealed chunk; `last` when nothing follows it in the file.
    pub fn open(&mut self, sealed: &[u8], last: bool) -> io::Result<Vec<u8>> {
        if self.finished {
            return Err(damaged("data after the last chunk"));
        }
        if sealed.len() < TAG || (!last && sealed.len() != SEALED_CHUNK) {
            return Err(damaged("truncated"));
        }
        let n = nonce(&self.header, self.counter, last);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(&n),
                Payload {
                    msg: sealed,
                    aad: &self.header,
                },
            )
            .map_err(|_| {
                damaged(format!(
                    "chunk {} failed authentication (changed, reordered, truncated or another key)",
                    self.counter
                ))
            })?;
        self.counter = self.counter.wrapping_add(1);
        self.finished = last;
        Ok(plain)
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Continue at chunk `index` (a reader that seeked to it, for a byte range): that chunk
    /// still only opens at its own position, so nothing can be passed off as another part.
    pub fn seek_chunk(&mut self, index: u32) {
        self.counter = index;
        self.finished = false;
    }
}

/// Read until `buf` is full or the input ends; how many bytes were read.
pub fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Encrypts everything written to it into `inner`; [`EncryptWriter::finish`] writes the last
/// chunk (without it the output is incomplete and will not decrypt).
pub struct EncryptWriter<W: Write> {
    inner: W,
    sealer: Sealer,
    buf: Vec<u8>,
}

impl<W: Write> EncryptWriter<W> {
    pub fn new(key: &SecretKey, mut inner: W) -> io::Result<EncryptWriter<W>> {
        let sealer = Sealer::new(key);
        inner.write_all(sealer.header())?;
        Ok(EncryptWriter {
            inner,
            sealer,
            buf: Vec::with_capacity(CHUNK),
        })
    }

    /// Seal the rest as the last chunk and hand back the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let sealed = self.sealer.seal(&self.buf, true)?;
        self.inner.write_all(&sealed)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for EncryptWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // A full chunk is sealed only once more data arrives: until then it may be the last.
        if self.buf.len() == CHUNK {
            let sealed = self.sealer.seal(&self.buf, false)?;
            self.inner.write_all(&sealed)?;
            self.buf.clear();
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts what it reads from `inner`; reading past the end of a damaged or truncated input
/// is an `InvalidData` error, never wrong bytes.
pub struct DecryptReader<R: Read> {
    inner: io::BufReader<R>,
    opener: Opener,
    sealed: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
}

impl<R: Read> DecryptReader<R> {
    pub fn new(key: &SecretKey, inner: R) -> io::Result<DecryptReader<R>> {
        let mut inner = io::BufReader::with_capacity(SEALED_CHUNK, inner);
        let mut header = [0u8; HEADER_LEN];
        if read_full(&mut inner, &mut header)? != HEADER_LEN {
            return Err(damaged("shorter than its header"));
        }
        Ok(DecryptReader {
            opener: Opener::new(key, &header)?,
            inner,
            sealed: vec![0u8; SEALED_CHUNK],
            plain: Vec::new(),
            pos: 0,
        })
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let got = read_full(&mut self.inner, &mut self.sealed)?;
        if got == 0 {
            return Err(damaged("truncated (the last chunk is missing)"));
        }
        let last = got < SEALED_CHUNK || self.inner.fill_buf()?.is_empty();
        self.plain = self.opener.open(&self.sealed[..got], last)?;
        self.pos = 0;
        Ok(())
    }
}

impl<R: Read> Read for DecryptReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.opener.finished() || out.is_empty() {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey([3u8; 32])
    }

    fn encrypt(data: &[u8]) -> Vec<u8> {
        let mut w = EncryptWriter::new(&key(), Vec::new()).expect("writer");
        w.write_all(data).expect("write");
        w.finish().expect("finish")
    }

    fn decrypt(data: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        DecryptReader::new(&key(), data)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_every_boundary() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = encrypt(&data);
            let chunks = len.div_ceil(CHUNK).max(1);
            assert_eq!(sealed.len(), HEADER_LEN + len + chunks * TAG, "len {len}");
            assert_eq!(decrypt(&sealed).expect("decrypts"), data, "len {len}");
        }
    }

    #[test]
    fn changes_truncation_reordering_and_appending_are_errors() {
        let data = vec![42u8; 3 * CHUNK + 5];
        let sealed = encrypt(&data);
        let mut flipped = sealed.clone();
        flipped[HEADER_LEN + CHUNK + 100] ^= 1;
        assert!(decrypt(&flipped).is_err());
        let mut header = sealed.clone();
        header[12] ^= 1;
        assert!(decrypt(&header).is_err());
        // Cut at a chunk boundary: the new last chunk was not sealed as last.
        assert!(decrypt(&sealed[..HEADER_LEN + 2 * SEALED_CHUNK]).is_err());
        assert!(decrypt(&sealed[..sealed.len() - 1]).is_err());
        let mut swapped = sealed.clone();
        let (a, b) = (HEADER_LEN, HEADER_LEN + SEALED_CHUNK);
        let first = sealed[a..b].to_vec();
        swapped[a..b].copy_from_slice(&sealed[b..b + SEALED_CHUNK]);
        swapped[b..b + SEALED_CHUNK].copy_from_slice(&first);
        assert!(decrypt(&swapped).is_err());
        let mut longer = sealed.clone();
        longer.extend_from_slice(&sealed[HEADER_LEN..HEADER_LEN + SEALED_CHUNK]);
        assert!(decrypt(&longer).is_err());
        let other = SecretKey([4u8; 32]);
        let mut out = Vec::new();
        assert!(DecryptReader::new(&other, &sealed[..])
            .and_then(|mut r| r.read_to_end(&mut out))
            .is_err());
    }
}
