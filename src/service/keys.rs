//! End-to-end encryption keys, the server's side of Olm/Megolm: device keys, one-time and
//! fallback keys, cross-signing keys and the signatures users add to keys, and the device-list
//! log (whose keys or shared rooms changed when) behind `device_lists` in sync and
//! `/keys/changes`. The server only ever holds public keys; it checks signatures where the spec
//! asks and hands keys out.

use std::collections::{BTreeMap, BTreeSet};

use parking_lot::Mutex;
use ruma::{
    serde::Base64, signatures::SigningKeyAlgorithm, CanonicalJsonObject, DeviceId, OwnedRoomId,
    OwnedUserId, UserId,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    error::{ErrCode, Error, Result},
    service::rooms::pdu::to_canonical,
    storage::{keys, Batch, Storage, Table},
};

/// Most one-time keys (of all algorithms together) a device may keep on the server.
pub const MAX_ONE_TIME_KEYS: u64 = 10_000;
/// Most algorithms a device may keep a fallback key for.
pub const MAX_FALLBACK_ALGORITHMS: usize = 16;
/// Largest serialized key object (device keys with many signatures stay far below this).
pub const MAX_KEY_BYTES: usize = 16 * 1024;
/// Most entries of the device-list log one sync or `/keys/changes` reads.
pub const MAX_LOG_SCAN: usize = 50_000;

/// The kinds of cross-signing key, as named in `/keys/device_signing/upload`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrossSigning {
    Master,
    SelfSigning,
    UserSigning,
}

impl CrossSigning {
    pub const ALL: [CrossSigning; 3] = [
        CrossSigning::Master,
        CrossSigning::SelfSigning,
        CrossSigning::UserSigning,
    ];

    fn name(self) -> &'static str {
        match self {
            CrossSigning::Master => "master",
            CrossSigning::SelfSigning => "self_signing",
            CrossSigning::UserSigning => "user_signing",
        }
    }
}

/// One entry of the device-list log.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ListChange {
    /// The user's devices, device keys or cross-signing keys changed.
    Keys { user: OwnedUserId },
    /// The user joined (`joined`) or stopped being joined to the room.
    Membership {
        user: OwnedUserId,
        room: OwnedRoomId,
        joined: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FallbackKey {
    key_id: String,
    key: Value,
    used: bool,
}

pub struct Keys {
    storage: Storage,
    /// One-time keys are counted and handed out under this lock, so that two claims never get
    /// the same key and the stored counts stay exact.
    otk_lock: Mutex<()>,
}

/// What `/keys/upload` changed.
pub struct Uploaded {
    pub one_time_key_counts: BTreeMap<String, u64>,
    /// The device keys are new or different: the device list changed.
    pub device_keys_changed: bool,
}

impl Keys {
    pub fn new(storage: Storage) -> Keys {
        Keys {
            storage,
            otk_lock: Mutex::new(()),
        }
    }

    /// Store what a device uploads. `log_count` is the stream count under which a change of the
    /// device keys is logged (the caller finishes it).
    pub fn upload(
        &self,
        user: &UserId,
        device: &DeviceId,
        device_keys: Option<&Map<String, Value>>,
        one_time_keys: Option<&Map<String, Value>>,
        fallback_keys: Option<&Map<String, Value>>,
        log_count: u64,
    ) -> Result<Uploaded> {
        let _otk = self.otk_lock.lock();
        let mut b = self.storage.batch();
        let mut device_keys_changed = false;
        if let Some(dk) = device_keys {
            check_device_keys(dk, user, device)?;
            let key = keys::join(&[user.as_str(), device.as_str()]);
            let stored: Option<Value> = self.storage.get_json(Table::DeviceKeys, &key)?;
            let new = Value::Object(dk.clone());
            if stored.as_ref() != Some(&new) {
                b.put(Table::DeviceKeys, &key, &serde_json::to_vec(&new)?)?;
                log_change(
                    &mut b,
                    log_count,
                    &ListChange::Keys {
                        user: user.to_owned(),
                    },
                )?;
                device_keys_changed = true;
            }
        }

        let mut counts = self.one_time_key_counts(user, device)?;
        let mut total: u64 = counts.values().sum();
        if let Some(otks) = one_time_keys {
            for (full_id, key) in otks {
                let (algorithm, key_id) = split_key_id(full_id)?;
                check_key_object(key, user)?;
                let row = keys::join(&[user.as_str(), device.as_str(), algorithm, key_id]);
                match self.storage.get_json::<Value>(Table::OneTimeKeys, &row)? {
                    Some(existing) if existing == *key => continue,
                    Some(_) => {
                        return Err(Error::invalid_param(format!(
                            "One-time key {full_id} already exists with different content"
                        )))
                    }
                    None => {}
                }
                // Bounded over all algorithms: new algorithm names must not open new room.
                if total >= MAX_ONE_TIME_KEYS {
                    return Err(Error::invalid_param(format!(
                        "A device may keep at most {MAX_ONE_TIME_KEYS} one-time keys"
                    )));
                }
                total += 1;
                *counts.entry(algorithm.to_owned()).or_insert(0) += 1;
                b.put(Table::OneTimeKeys, &row, &serde_json::to_vec(key)?)?;
            }
            b.put(
                Table::OneTimeKeyCounts,
                &keys::join(&[user.as_str(), device.as_str()]),
                &serde_json::to_vec(&counts)?,
            )?;
        }

        if let Some(fallback) = fallback_keys {
            let prefix = keys::prefix(&[user.as_str(), device.as_str()]);
            let mut algorithms = self
                .storage
                .scan_prefix(Table::FallbackKeys, &prefix)?
                .take(MAX_FALLBACK_ALGORITHMS + 1)
                .count();
            let mut seen = BTreeSet::new();
            for (full_id, key) in fallback {
                let (algorithm, key_id) = split_key_id(full_id)?;
                check_key_object(key, user)?;
                if !seen.insert(algorithm) {
                    return Err(Error::invalid_param(
                        "At most one fallback key per algorithm may be uploaded",
                    ));
                }
                let row = keys::join(&[user.as_str(), device.as_str(), algorithm]);
                let existing: Option<FallbackKey> =
                    self.storage.get_json(Table::FallbackKeys, &row)?;
                if existing.is_none() {
                    if algorithms >= MAX_FALLBACK_ALGORITHMS {
                        return Err(Error::invalid_param(format!(
                            "A device may keep fallback keys for at most {MAX_FALLBACK_ALGORITHMS} algorithms"
                        )));
                    }
                    algorithms += 1;
                }
                // Re-uploading the same key keeps whether it was used.
                let used = existing
                    .filter(|e| e.key_id == key_id && e.key == *key)
                    .map(|e| e.used)
                    .unwrap_or(false);
                let record = FallbackKey {
                    key_id: key_id.to_owned(),
                    key: key.clone(),
                    used,
                };
                b.put(Table::FallbackKeys, &row, &serde_json::to_vec(&record)?)?;
            }
        }
        b.commit()?;
        counts.retain(|_, n| *n > 0);
        Ok(Uploaded {
            one_time_key_counts: counts,
            device_keys_changed,
        })
    }

    /// Unclaimed one-time keys of the device, per algorithm.
    pub fn one_time_key_counts(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<BTreeMap<String, u64>> {
        Ok(self
            .storage
            .get_json(
                Table::OneTimeKeyCounts,
                &keys::join(&[user.as_str(), device.as_str()]),
            )?
            .unwrap_or_default())
    }

    /// Algorithms with a fallback key that has not been handed out yet.
    pub fn unused_fallback_key_types(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let prefix = keys::prefix(&[user.as_str(), device.as_str()]);
        for entry in self
            .storage
            .scan_prefix(Table::FallbackKeys, &prefix)?
            .take(64)
        {
            let (k, v) = entry?;
            let record: FallbackKey = serde_json::from_slice(&v)?;
            if !record.used {
                if let Some(alg) = keys::last_part(&k) {
                    out.push(alg.to_owned());
                }
            }
        }
        Ok(out)
    }

    /// Hand out one key of `algorithm` for the device: a one-time key (deleted as it goes), or
    /// the fallback key when none is left. Returns `(algorithm:key_id, key)`.
    pub fn claim(
        &self,
        user: &UserId,
        device: &DeviceId,
        algorithm: &str,
    ) -> Result<Option<(String, Value)>> {
        if algorithm.is_empty() || algorithm.contains('\u{ff}') {
            return Ok(None);
        }
        let _otk = self.otk_lock.lock();
        let prefix = keys::prefix(&[user.as_str(), device.as_str(), algorithm]);
        let first = self
            .storage
            .scan_prefix(Table::OneTimeKeys, &prefix)?
            .next()
            .transpose()?;
        if let Some((k, v)) = first {
            let key_id = keys::last_part(&k).unwrap_or_default().to_owned();
            let key: Value = serde_json::from_slice(&v)?;
            let mut counts = self.one_time_key_counts(user, device)?;
            if let Some(n) = counts.get_mut(algorithm) {
                *n = n.saturating_sub(1);
            }
            let mut b = self.storage.batch();
            b.delete(Table::OneTimeKeys, &k)?;
            b.put(
                Table::OneTimeKeyCounts,
                &keys::join(&[user.as_str(), device.as_str()]),
                &serde_json::to_vec(&counts)?,
            )?;
            b.commit()?;
            return Ok(Some((format!("{algorithm}:{key_id}"), key)));
        }
        let row = keys::join(&[user.as_str(), device.as_str(), algorithm]);
        let Some(mut fallback) = self
            .storage
            .get_json::<FallbackKey>(Table::FallbackKeys, &row)?
        else {
            return Ok(None);
        };
        if !fallback.used {
            fallback.used = true;
            self.storage
                .put(Table::FallbackKeys, &row, &serde_json::to_vec(&fallback)?)?;
        }
        Ok(Some((
            format!("{algorithm}:{}", fallback.key_id),
            fallback.key,
        )))
    }

    /// The device keys as uploaded, with the signatures others added merged in.
    pub fn device_keys(&self, user: &UserId, device: &DeviceId) -> Result<Option<Value>> {
        let Some(mut v) = self.storage.get_json::<Value>(
            Table::DeviceKeys,
            &keys::join(&[user.as_str(), device.as_str()]),
        )?
        else {
            return Ok(None);
        };
        self.merge_signatures(user, device.as_str(), &mut v)?;
        Ok(Some(v))
    }

    /// Every device of the user that has uploaded keys: (device id, keys).
    pub fn all_device_keys(&self, user: &UserId) -> Result<Vec<(String, Value)>> {
        let mut out = Vec::new();
        let prefix = keys::prefix(&[user.as_str()]);
        for entry in self.storage.scan_prefix(Table::DeviceKeys, &prefix)? {
            let (k, v) = entry?;
            let Some(device) = keys::last_part(&k) else {
                continue;
            };
            let mut v: Value = serde_json::from_slice(&v)?;
            self.merge_signatures(user, device, &mut v)?;
            out.push((device.to_owned(), v));
        }
        Ok(out)
    }

    /// The raw stored device keys (no merged signatures), for signature checks.
    fn stored_device_keys(&self, user: &UserId, device: &str) -> Result<Option<Value>> {
        self.storage
            .get_json(Table::DeviceKeys, &keys::join(&[user.as_str(), device]))
    }

    /// A cross-signing key of the user, with added signatures merged in.
    pub fn cross_signing_key(&self, user: &UserId, kind: CrossSigning) -> Result<Option<Value>> {
        let Some(mut v) = self.stored_cross_signing_key(user, kind)? else {
            return Ok(None);
        };
        if let Some(public) = single_public_key(&v) {
            self.merge_signatures(user, &public, &mut v)?;
        }
        Ok(Some(v))
    }

    fn stored_cross_signing_key(&self, user: &UserId, kind: CrossSigning) -> Result<Option<Value>> {
        self.storage.get_json(
            Table::CrossSigningKeys,
            &keys::join(&[user.as_str(), kind.name()]),
        )
    }

    /// Replace the user's cross-signing keys (those given). Checks the shapes and that the
    /// self-signing and user-signing keys are signed by the (new or current) master key.
    pub fn set_cross_signing(
        &self,
        user: &UserId,
        master: Option<&Map<String, Value>>,
        self_signing: Option<&Map<String, Value>>,
        user_signing: Option<&Map<String, Value>>,
        log_count: u64,
    ) -> Result<()> {
        let current_master = self.stored_cross_signing_key(user, CrossSigning::Master)?;
        let master_value = match master {
            Some(m) => {
                check_cross_signing_key(m, user, "master")?;
                Value::Object(m.clone())
            }
            None => current_master.clone().ok_or_else(|| {
                Error::new(ErrCode::MissingParam, "No master signing key is available")
            })?,
        };
        let master_public = single_public_key(&master_value)
            .ok_or_else(|| Error::invalid_param("The master key must hold exactly one key"))?;
        let devices: BTreeSet<String> = self
            .storage
            .scan_prefix(Table::Devices, &keys::prefix(&[user.as_str()]))?
            .filter_map(|e| e.ok())
            .filter_map(|(k, _)| keys::last_part(&k).map(str::to_owned))
            .collect();
        let mut b = self.storage.batch();
        for (kind, key) in [
            (CrossSigning::Master, master),
            (CrossSigning::SelfSigning, self_signing),
            (CrossSigning::UserSigning, user_signing),
        ] {
            let Some(key) = key else { continue };
            if kind != CrossSigning::Master {
                check_cross_signing_key(key, user, kind.name())?;
                verify_signature(
                    key,
                    user,
                    &format!("ed25519:{master_public}"),
                    &master_public,
                )
                .map_err(|_| {
                    Error::new(
                        ErrCode::InvalidSignature,
                        format!("The {} key is not signed by the master key", kind.name()),
                    )
                })?;
            }
            let value = Value::Object(key.clone());
            if let Some(public) = single_public_key(&value) {
                if devices.contains(&public) {
                    return Err(Error::forbidden("Key ID in use"));
                }
            }
            b.put(
                Table::CrossSigningKeys,
                &keys::join(&[user.as_str(), kind.name()]),
                &serde_json::to_vec(&value)?,
            )?;
        }
        log_change(
            &mut b,
            log_count,
            &ListChange::Keys {
                user: user.to_owned(),
            },
        )?;
        b.commit()
    }

    /// Whether uploading these cross-signing keys needs user-interactive auth: not for the
    /// first master key, nor when every key given equals the stored one.
    pub fn cross_signing_needs_auth(
        &self,
        user: &UserId,
        given: &[(CrossSigning, Option<&Map<String, Value>>)],
    ) -> Result<bool> {
        if self
            .stored_cross_signing_key(user, CrossSigning::Master)?
            .is_none()
        {
            return Ok(false);
        }
        for (kind, key) in given {
            let Some(key) = key else { continue };
            let stored = self.stored_cross_signing_key(user, *kind)?;
            if stored.as_ref() != Some(&Value::Object((*key).clone())) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Add the signatures `signer` made over one key of `target` (`/keys/signatures/upload`).
    /// `key_id` is a device id or a cross-signing public key. Errors name what failed.
    pub fn add_signatures(
        &self,
        signer: &UserId,
        target: &UserId,
        key_id: &str,
        signed: &Map<String, Value>,
    ) -> Result<bool> {
        // Which key is being signed, and which of the signer's keys may sign it.
        let (stored, allowed_signers): (Value, Vec<(String, String)>) = if target == signer {
            if let Some(dk) = self.stored_device_keys(target, key_id)? {
                // Own device, signed by the own self-signing key.
                let ssk = self
                    .stored_cross_signing_key(signer, CrossSigning::SelfSigning)?
                    .and_then(|k| single_public_key(&k))
                    .ok_or_else(|| Error::invalid_param("No self-signing key is uploaded"))?;
                (dk, vec![(format!("ed25519:{ssk}"), ssk)])
            } else {
                let master = self
                    .stored_cross_signing_key(target, CrossSigning::Master)?
                    .filter(|m| single_public_key(m).as_deref() == Some(key_id))
                    .ok_or_else(|| Error::not_found("Unknown key"))?;
                // Own master key, signed by one of the own devices.
                let mut signers = Vec::new();
                for (device, dk) in self.all_device_keys(signer)? {
                    let key_name = format!("ed25519:{device}");
                    if let Some(public) = dk
                        .get("keys")
                        .and_then(|k| k.get(&key_name))
                        .and_then(Value::as_str)
                    {
                        signers.push((key_name, public.to_owned()));
                    }
                }
                (master, signers)
            }
        } else {
            // Another user's master key, signed by the signer's user-signing key.
            let master = self
                .stored_cross_signing_key(target, CrossSigning::Master)?
                .filter(|m| single_public_key(m).as_deref() == Some(key_id))
                .ok_or_else(|| Error::not_found("Unknown key"))?;
            let usk = self
                .stored_cross_signing_key(signer, CrossSigning::UserSigning)?
                .and_then(|k| single_public_key(&k))
                .ok_or_else(|| Error::invalid_param("No user-signing key is uploaded"))?;
            (master, vec![(format!("ed25519:{usk}"), usk)])
        };
        if strip_signatures(&stored) != strip_signatures(&Value::Object(signed.clone())) {
            return Err(Error::invalid_param(
                "The signed object does not match the stored key",
            ));
        }
        let mut added = 0;
        let mut b = self.storage.batch();
        let sigs = signed
            .get("signatures")
            .and_then(|s| s.get(signer.as_str()))
            .and_then(Value::as_object)
            .ok_or_else(|| Error::invalid_param("No signature of the signer"))?;
        for (signer_key_id, sig) in sigs {
            let Some((_, public)) = allowed_signers.iter().find(|(id, _)| id == signer_key_id)
            else {
                continue;
            };
            let sig = sig
                .as_str()
                .ok_or_else(|| Error::invalid_param("A signature must be a string"))?;
            verify_signature(signed, signer, signer_key_id, public)
                .map_err(|_| Error::new(ErrCode::InvalidSignature, "Invalid signature"))?;
            b.put(
                Table::KeySignatures,
                &keys::join(&[
                    target.as_str(),
                    key_id,
                    signer.as_str(),
                    signer_key_id.as_str(),
                ]),
                sig.as_bytes(),
            )?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::new(
                ErrCode::InvalidSignature,
                "No signature by a key allowed to sign this key",
            ));
        }
        b.commit()?;
        Ok(true)
    }

    /// Delete every signature `signer` made on other users' keys (erasure; the signatures on
    /// their own keys go with their rows). The table is scanned whole, at most `max_rows` rows.
    /// Returns how many were deleted.
    pub fn remove_signatures_by(&self, signer: &UserId, max_rows: usize) -> Result<usize> {
        let mut rows = Vec::new();
        for entry in self
            .storage
            .scan_prefix(Table::KeySignatures, b"")?
            .take(max_rows)
        {
            let (k, _) = entry?;
            if keys::split(&k).get(2) == Some(&signer.as_str()) {
                rows.push(k);
            }
        }
        let mut b = self.storage.batch();
        for k in &rows {
            b.delete(Table::KeySignatures, k)?;
        }
        b.commit()?;
        Ok(rows.len())
    }

    fn merge_signatures(&self, target: &UserId, key_id: &str, value: &mut Value) -> Result<()> {
        let prefix = keys::prefix(&[target.as_str(), key_id]);
        for entry in self
            .storage
            .scan_prefix(Table::KeySignatures, &prefix)?
            .take(1000)
        {
            let (k, v) = entry?;
            let parts = keys::split(&k);
            let (Some(signer), Some(signer_key)) = (parts.get(2), parts.get(3)) else {
                continue;
            };
            let Some(obj) = value.as_object_mut() else {
                return Ok(());
            };
            let sigs = obj
                .entry("signatures")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(sigs) = sigs.as_object_mut() {
                let per_signer = sigs
                    .entry(signer.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(per_signer) = per_signer.as_object_mut() {
                    per_signer.insert(
                        signer_key.to_string(),
                        Value::String(String::from_utf8_lossy(&v).into_owned()),
                    );
                }
            }
        }
        Ok(())
    }

    /// Device-list log entries with counts in `(from, to]`, oldest first, at most `MAX_LOG_SCAN`.
    pub fn changes(&self, from: u64, to: u64) -> Result<Vec<(u64, ListChange)>> {
        let mut out = Vec::new();
        if to <= from {
            return Ok(out);
        }
        let start = (from + 1).to_be_bytes();
        for entry in self
            .storage
            .scan_from(Table::DeviceListLog, b"", &start, false)?
            .take(MAX_LOG_SCAN)
        {
            let (k, v) = entry?;
            let Some(count) = keys::u64_value(&k) else {
                continue;
            };
            if count > to {
                break;
            }
            if let Ok(change) = serde_json::from_slice::<Vec<ListChange>>(&v) {
                out.extend(change.into_iter().map(|c| (count, c)));
            }
        }
        Ok(out)
    }
}

/// Remove everything E2EE of a device (it is being deleted), in the caller's batch.
pub fn remove_device_rows(
    storage: &Storage,
    b: &mut Batch,
    user: &UserId,
    device: &DeviceId,
) -> Result<()> {
    let row = keys::join(&[user.as_str(), device.as_str()]);
    b.delete(Table::DeviceKeys, &row)?;
    b.delete(Table::OneTimeKeyCounts, &row)?;
    let prefix = keys::prefix(&[user.as_str(), device.as_str()]);
    for table in [Table::OneTimeKeys, Table::FallbackKeys, Table::ToDevice] {
        for entry in storage.scan_prefix(table, &prefix)? {
            let (k, _) = entry?;
            b.delete(table, &k)?;
        }
    }
    let sig_prefix = keys::prefix(&[user.as_str(), device.as_str()]);
    for entry in storage.scan_prefix(Table::KeySignatures, &sig_prefix)? {
        let (k, _) = entry?;
        b.delete(Table::KeySignatures, &k)?;
    }
    Ok(())
}

/// Write a device-list log entry under `count` into the caller's batch. Several changes under
/// one count are kept together.
pub fn log_change(b: &mut Batch, count: u64, change: &ListChange) -> Result<()> {
    log_changes(b, count, std::slice::from_ref(change))
}

pub fn log_changes(b: &mut Batch, count: u64, changes: &[ListChange]) -> Result<()> {
    b.put(
        Table::DeviceListLog,
        &count.to_be_bytes(),
        &serde_json::to_vec(changes)?,
    )
}

/// `algorithm:key_id`, both parts non-empty and free of our key separator.
fn split_key_id(full: &str) -> Result<(&str, &str)> {
    match full.split_once(':') {
        Some((a, k)) if !a.is_empty() && !k.is_empty() && !full.contains('\u{ff}') => Ok((a, k)),
        _ => Err(Error::invalid_param(format!(
            "Key id {full:?} is not of the form <algorithm>:<key_id>"
        ))),
    }
}

/// A one-time or fallback key: a string (unsigned curve25519) or an object whose signatures,
/// if any, are by the uploader. Bounded in size.
fn check_key_object(key: &Value, user: &UserId) -> Result<()> {
    if serde_json::to_vec(key)?.len() > MAX_KEY_BYTES {
        return Err(Error::new(ErrCode::TooLarge, "Key is too large"));
    }
    match key {
        Value::String(_) => Ok(()),
        Value::Object(o) => {
            if !o.get("key").is_some_and(Value::is_string) {
                return Err(Error::bad_json("A signed key needs a string `key`"));
            }
            if let Some(sigs) = o.get("signatures") {
                let ok = sigs
                    .as_object()
                    .is_some_and(|s| s.keys().all(|signer| signer == user.as_str()));
                if !ok {
                    return Err(Error::bad_json(
                        "A key may only carry its owner's signatures",
                    ));
                }
            }
            Ok(())
        }
        _ => Err(Error::bad_json("A key must be a string or an object")),
    }
}

fn check_device_keys(dk: &Map<String, Value>, user: &UserId, device: &DeviceId) -> Result<()> {
    if serde_json::to_vec(dk)?.len() > MAX_KEY_BYTES {
        return Err(Error::new(ErrCode::TooLarge, "Device keys are too large"));
    }
    if dk.get("user_id").and_then(Value::as_str) != Some(user.as_str()) {
        return Err(Error::invalid_param(
            "device_keys.user_id must be the user's own id",
        ));
    }
    if dk.get("device_id").and_then(Value::as_str) != Some(device.as_str()) {
        return Err(Error::invalid_param(
            "device_keys.device_id must be the id of the uploading device",
        ));
    }
    let algorithms_ok = dk
        .get("algorithms")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().all(Value::is_string));
    let keys_ok = dk
        .get("keys")
        .and_then(Value::as_object)
        .is_some_and(|k| k.values().all(Value::is_string));
    let sigs_ok = dk.get("signatures").is_some_and(Value::is_object);
    if !algorithms_ok || !keys_ok || !sigs_ok {
        return Err(Error::bad_json(
            "device_keys needs algorithms (strings), keys (strings) and signatures",
        ));
    }
    Ok(())
}

fn check_cross_signing_key(key: &Map<String, Value>, user: &UserId, usage: &str) -> Result<()> {
    if serde_json::to_vec(key)?.len() > MAX_KEY_BYTES {
        return Err(Error::new(ErrCode::TooLarge, "Key is too large"));
    }
    if key.get("user_id").and_then(Value::as_str) != Some(user.as_str()) {
        return Err(Error::invalid_param("user_id must be the user's own id"));
    }
    let usage_ok = key
        .get("usage")
        .and_then(Value::as_array)
        .is_some_and(|u| u.iter().any(|x| x.as_str() == Some(usage)));
    if !usage_ok {
        return Err(Error::invalid_param(format!(
            "The {usage} key must list {usage:?} in its usage"
        )));
    }
    if single_public_key(&Value::Object(key.clone())).is_none() {
        return Err(Error::invalid_param(
            "A cross-signing key must hold exactly one ed25519 key",
        ));
    }
    Ok(())
}

/// The public key of a cross-signing key object (`keys` with exactly one `ed25519:<pub>`).
pub fn single_public_key(key: &Value) -> Option<String> {
    let keys = key.get("keys")?.as_object()?;
    if keys.len() != 1 {
        return None;
    }
    let (id, public) = keys.iter().next()?;
    let public = public.as_str()?;
    let id_part = id.strip_prefix("ed25519:")?;
    (id_part == public).then(|| public.to_owned())
}

/// The object without `signatures` and `unsigned`: what a signature covers.
fn strip_signatures(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("signatures");
        o.remove("unsigned");
    }
    v
}

/// Check `signer`'s signature `signer_key_id` over `object` with the public key (unpadded base64).
fn verify_signature(
    object: &Map<String, Value>,
    signer: &UserId,
    signer_key_id: &str,
    public: &str,
) -> Result<()> {
    let sig = object
        .get("signatures")
        .and_then(|s| s.get(signer.as_str()))
        .and_then(|s| s.get(signer_key_id))
        .and_then(Value::as_str)
        .ok_or_else(|| Error::new(ErrCode::InvalidSignature, "Missing signature"))?;
    let sig: Base64 = Base64::parse(sig)
        .map_err(|_| Error::new(ErrCode::InvalidSignature, "Signature is not base64"))?;
    let public: Base64 = Base64::parse(public)
        .map_err(|_| Error::new(ErrCode::InvalidSignature, "Public key is not base64"))?;
    let canonical: CanonicalJsonObject = to_canonical(Value::Object(object.clone()))?;
    let bytes = ruma::signatures::to_canonical_json_string_for_signing(&canonical)
        .map_err(|_| Error::bad_json("The key is not canonical JSON"))?;
    ruma::signatures::verify_canonical_json_bytes(
        &SigningKeyAlgorithm::Ed25519,
        public.as_bytes(),
        sig.as_bytes(),
        bytes.as_bytes(),
    )
    .map_err(|_| Error::new(ErrCode::InvalidSignature, "Invalid signature"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{single_public_key, split_key_id};

    #[test]
    fn key_ids() {
        assert_eq!(
            split_key_id("signed_curve25519:AAAAHg").ok(),
            Some(("signed_curve25519", "AAAAHg"))
        );
        assert!(split_key_id("no_separator").is_err());
        assert!(split_key_id(":id").is_err());
        assert!(split_key_id("alg:").is_err());
    }

    #[test]
    fn cross_signing_public_key() {
        let key = json!({ "keys": { "ed25519:abc": "abc" } });
        assert_eq!(single_public_key(&key).as_deref(), Some("abc"));
        // The id must name the key itself, and there must be exactly one.
        assert_eq!(
            single_public_key(&json!({ "keys": { "ed25519:x": "abc" } })),
            None
        );
        assert_eq!(
            single_public_key(&json!({ "keys": { "ed25519:a": "a", "ed25519:b": "b" } })),
            None
        );
        assert_eq!(
            single_public_key(&json!({ "keys": { "curve25519:a": "a" } })),
            None
        );
    }
}
