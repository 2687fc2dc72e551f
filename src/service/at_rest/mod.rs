//! Encryption at rest (REQUIREMENTS C2): the operator's key and what is derived from it, and the
//! chunked AEAD format ([`stream`]) that media files and backup archives are written in.
//!
//! The key file holds 32 random bytes, written as 64 hex digits or as base64. Each use gets its
//! own key derived from it (HMAC-SHA256 of the key over a label), so the same file can serve
//! media and backups without one ciphertext helping to attack the other, and the key that names
//! media files is not the key that encrypts them.

pub mod stream;

use std::path::Path;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A 32-byte secret. `Debug` never shows it, so it cannot reach a log by accident.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// Read a key file: 64 hex digits or base64 of exactly 32 bytes (surrounding whitespace is
    /// ignored). The file must not be readable by everyone. Errors name the file and what is
    /// wrong with it, never its content.
    pub fn load(path: &Path) -> Result<SecretKey, String> {
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("cannot read the key file {shown}: {e}"))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o007 != 0 {
                return Err(format!(
                    "the key file {shown} is accessible to every user; restrict it (chmod 600)"
                ));
            }
        }
        if meta.len() > 1024 {
            return Err(format!("the key file {shown} is not a key (too long)"));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key file {shown}: {e}"))?;
        SecretKey::parse(text.trim())
            .ok_or_else(|| format!("the key file {shown} must hold 32 bytes as 64 hex digits or base64 (e.g. `openssl rand -hex 32`)"))
    }

    fn parse(text: &str) -> Option<SecretKey> {
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
                .ok()?
        };
        Some(SecretKey(bytes.try_into().ok()?))
    }

    /// The key for one purpose: HMAC-SHA256(key, label).
    pub fn derive(&self, label: &str) -> SecretKey {
        SecretKey(hmac_sha256(&self.0, label.as_bytes()))
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// HMAC-SHA256 of `data` under this key.
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.0, data)
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts every key length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The keys a config names, loaded at start (a missing or bad key file stops the start).
#[derive(Clone, Debug, Default)]
pub struct AtRestKeys {
    /// Encrypts new media files and thumbnails (`media_encryption_key_file`).
    pub media: Option<SecretKey>,
    /// Encrypts backups (`backup_encryption_key_file`, else the media key).
    pub backup: Option<SecretKey>,
}

impl AtRestKeys {
    pub fn load(config: &crate::config::Config) -> Result<AtRestKeys, String> {
        let media = config
            .media_encryption_key_file
            .as_deref()
            .map(SecretKey::load)
            .transpose()?;
        let backup = match &config.backup_encryption_key_file {
            Some(path) => Some(SecretKey::load(path)?),
            None => media.clone(),
        };
        Ok(AtRestKeys { media, backup })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_from_hex_and_base64_only_when_32_bytes() {
        let hex = "00".repeat(31) + "ff";
        assert_eq!(SecretKey::parse(&hex).map(|k| k.0[31]), Some(0xff));
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(SecretKey::parse(&b64).map(|k| k.0[0]), Some(7));
        assert!(SecretKey::parse("00ff").is_none());
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        assert!(SecretKey::parse(&short).is_none());
        assert_eq!(format!("{:?}", SecretKey([1; 32])), "SecretKey(..)");
    }

    #[test]
    fn derived_keys_differ_by_label() {
        let k = SecretKey([9; 32]);
        assert_ne!(k.derive("a").0, k.derive("b").0);
        assert_eq!(k.derive("a").0, k.derive("a").0);
    }
}
