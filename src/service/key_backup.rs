//! Server-side key backup (`/room_keys`): versions of a user's backup and the encrypted room keys
//! stored in them. The server cannot read the keys; it keeps, for every (room, session), the best
//! copy by the spec's rule, and an `etag` and `count` per version so clients notice changes.

use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{
    error::{ErrCode, Error, Result},
    storage::{keys, Batch, Storage, Table},
};

/// Largest `auth_data` and largest single session record.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Most sessions one request may store.
pub const MAX_SESSIONS_PER_REQUEST: usize = 10_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Version {
    algorithm: String,
    auth_data: Value,
    /// Bumped on every change of the stored keys.
    etag: u64,
    count: u64,
}

pub struct KeyBackup {
    storage: Storage,
    /// Read-modify-write of a version's counters happens under this lock.
    lock: parking_lot::Mutex<()>,
}

/// The answer to every write or delete of keys.
pub fn update_response(count: u64, etag: u64) -> Value {
    json!({ "count": count, "etag": etag.to_string() })
}

fn not_found_version() -> Error {
    Error::not_found("Unknown backup version")
}

fn version_key(user: &UserId, version: u64) -> Vec<u8> {
    keys::with_count(&[user.as_str()], version)
}

fn put_version(b: &mut Batch, user: &UserId, version: u64, v: &Version) -> Result<()> {
    b.put(
        Table::BackupVersions,
        &version_key(user, version),
        &serde_json::to_vec(v)?,
    )
}

fn parse_version(v: &str) -> Option<u64> {
    v.parse().ok()
}

impl KeyBackup {
    pub fn new(storage: Storage) -> KeyBackup {
        KeyBackup {
            storage,
            lock: parking_lot::Mutex::new(()),
        }
    }

    fn latest(&self, user: &UserId) -> Result<Option<(u64, Version)>> {
        let prefix = keys::prefix(&[user.as_str()]);
        match self
            .storage
            .last_with_prefix(Table::BackupVersions, &prefix)?
        {
            Some((k, v)) => {
                let n = keys::count_suffix(&k).unwrap_or(0);
                Ok(Some((n, serde_json::from_slice(&v)?)))
            }
            None => Ok(None),
        }
    }

    fn get_version(&self, user: &UserId, version: &str) -> Result<(u64, Version)> {
        let n = parse_version(version).ok_or_else(not_found_version)?;
        let v: Version = self
            .storage
            .get_json(Table::BackupVersions, &version_key(user, n))?
            .ok_or_else(not_found_version)?;
        Ok((n, v))
    }

    fn info(n: u64, v: &Version) -> Value {
        json!({
            "algorithm": v.algorithm,
            "auth_data": v.auth_data,
            "count": v.count,
            "etag": v.etag.to_string(),
            "version": n.to_string(),
        })
    }

    pub fn create_version(
        &self,
        user: &UserId,
        algorithm: &str,
        auth_data: &Value,
    ) -> Result<String> {
        check_auth_data(auth_data)?;
        let _g = self.lock.lock();
        let next = self.latest(user)?.map(|(n, _)| n + 1).unwrap_or(1);
        // Version numbers are never reused, even after deletion: a tombstone keeps the place.
        let next = next.max(self.next_after_tombstone(user)?);
        let v = Version {
            algorithm: algorithm.to_owned(),
            auth_data: auth_data.clone(),
            etag: 0,
            count: 0,
        };
        let mut b = self.storage.batch();
        put_version(&mut b, user, next, &v)?;
        b.put(
            Table::BackupVersions,
            &next_key(user),
            &(next + 1).to_be_bytes(),
        )?;
        b.commit()?;
        Ok(next.to_string())
    }

    fn next_after_tombstone(&self, user: &UserId) -> Result<u64> {
        Ok(self
            .storage
            .get(Table::BackupVersions, &next_key(user))?
            .and_then(|v| keys::u64_value(&v))
            .unwrap_or(1))
    }

    /// The latest version's info, or M_NOT_FOUND.
    pub fn latest_info(&self, user: &UserId) -> Result<Value> {
        let (n, v) = self
            .latest(user)?
            .ok_or_else(|| Error::not_found("No current backup version"))?;
        Ok(Self::info(n, &v))
    }

    pub fn version_info(&self, user: &UserId, version: &str) -> Result<Value> {
        let (n, v) = self.get_version(user, version)?;
        Ok(Self::info(n, &v))
    }

    /// Only `auth_data` may change; the algorithm and version must match.
    pub fn update_version(
        &self,
        user: &UserId,
        version: &str,
        algorithm: &str,
        auth_data: &Value,
        body_version: Option<&str>,
    ) -> Result<()> {
        check_auth_data(auth_data)?;
        let _g = self.lock.lock();
        let (n, mut v) = self.get_version(user, version)?;
        if body_version.is_some_and(|bv| bv != version) {
            return Err(Error::invalid_param(
                "The version in the body does not match the path",
            ));
        }
        if v.algorithm != algorithm {
            return Err(Error::invalid_param(
                "The algorithm does not match the backup's algorithm",
            ));
        }
        v.auth_data = auth_data.clone();
        let mut b = self.storage.batch();
        put_version(&mut b, user, n, &v)?;
        b.commit()
    }

    pub fn delete_version(&self, user: &UserId, version: &str) -> Result<()> {
        let _g = self.lock.lock();
        let (n, _) = self.get_version(user, version)?;
        let mut b = self.storage.batch();
        b.delete(Table::BackupVersions, &version_key(user, n))?;
        let prefix = keys::with_count(&[user.as_str()], n);
        for entry in self.storage.scan_prefix(Table::BackupKeys, &prefix)? {
            let (k, _) = entry?;
            b.delete(Table::BackupKeys, &k)?;
        }
        b.commit()
    }

    /// Store sessions `(room, session, key data)` into `version`, which must be the latest.
    /// Returns the version's new (count, etag).
    pub fn put_keys(
        &self,
        user: &UserId,
        version: &str,
        sessions: Vec<(String, String, Value)>,
    ) -> Result<(u64, u64)> {
        if sessions.len() > MAX_SESSIONS_PER_REQUEST {
            return Err(Error::new(
                ErrCode::TooLarge,
                format!("At most {MAX_SESSIONS_PER_REQUEST} sessions per request"),
            ));
        }
        let _g = self.lock.lock();
        let (n, mut v) = self.get_version(user, version)?;
        let latest = self.latest(user)?.map(|(l, _)| l);
        if latest != Some(n) {
            return Err(Error::WrongRoomKeysVersion {
                current_version: latest.map(|l| l.to_string()),
            });
        }
        let mut b = self.storage.batch();
        let mut changed = false;
        for (room, session, data) in sessions {
            check_key_data(&data)?;
            if room.contains('\u{ff}') || session.contains('\u{ff}') {
                return Err(Error::invalid_param("Invalid room or session id"));
            }
            let key = session_key(user, n, &room, &session);
            let existing: Option<Value> = self.storage.get_json(Table::BackupKeys, &key)?;
            if let Some(old) = &existing {
                if !replaces(old, &data) {
                    continue;
                }
            } else {
                v.count += 1;
            }
            b.put(Table::BackupKeys, &key, &serde_json::to_vec(&data)?)?;
            changed = true;
        }
        if changed {
            v.etag += 1;
            put_version(&mut b, user, n, &v)?;
            b.commit()?;
        }
        Ok((v.count, v.etag))
    }

    /// Stored keys of a version, optionally of one room or one session: `{room: {session: data}}`.
    pub fn get_keys(
        &self,
        user: &UserId,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> Result<Map<String, Value>> {
        let (n, _) = self.get_version(user, version)?;
        let mut out: Map<String, Value> = Map::new();
        let prefix = match (room, session) {
            (Some(r), Some(s)) => session_key(user, n, r, s),
            (Some(r), None) => {
                let mut p = keys::with_count(&[user.as_str()], n);
                p.extend_from_slice(&keys::prefix(&[r]));
                p
            }
            _ => keys::with_count(&[user.as_str()], n),
        };
        let base_len = keys::with_count(&[user.as_str()], n).len();
        for entry in self.storage.scan_prefix(Table::BackupKeys, &prefix)? {
            let (k, v) = entry?;
            let rest = keys::split(&k[base_len..]);
            let (Some(r), Some(s)) = (rest.first(), rest.get(1)) else {
                continue;
            };
            if session.is_some() && Some(*s) != session {
                continue;
            }
            let data: Value = serde_json::from_slice(&v)?;
            let room_entry = out
                .entry(r.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(o) = room_entry.as_object_mut() {
                o.insert(s.to_string(), data);
            }
        }
        Ok(out)
    }

    /// Delete stored keys (all, of a room, or one session). Returns the new (count, etag).
    pub fn delete_keys(
        &self,
        user: &UserId,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> Result<(u64, u64)> {
        let _g = self.lock.lock();
        let (n, mut v) = self.get_version(user, version)?;
        let found = self.get_keys(user, version, room, session)?;
        let mut b = self.storage.batch();
        let mut removed = 0u64;
        for (r, sessions) in &found {
            if let Some(sessions) = sessions.as_object() {
                for s in sessions.keys() {
                    b.delete(Table::BackupKeys, &session_key(user, n, r, s))?;
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            v.count = v.count.saturating_sub(removed);
            v.etag += 1;
            put_version(&mut b, user, n, &v)?;
            b.commit()?;
        }
        Ok((v.count, v.etag))
    }
}

/// Where the next version number is kept: outside the user's version keys, so that the newest
/// version is simply the last key under the user's prefix.
fn next_key(user: &UserId) -> Vec<u8> {
    keys::join(&["next", user.as_str()])
}

fn session_key(user: &UserId, version: u64, room: &str, session: &str) -> Vec<u8> {
    let mut k = keys::with_count(&[user.as_str()], version);
    k.extend_from_slice(&keys::join(&[room, session]));
    k
}

fn check_auth_data(auth_data: &Value) -> Result<()> {
    if !auth_data.is_object() {
        return Err(Error::bad_json("auth_data must be an object"));
    }
    if serde_json::to_vec(auth_data)?.len() > MAX_RECORD_BYTES {
        return Err(Error::new(ErrCode::TooLarge, "auth_data is too large"));
    }
    Ok(())
}

fn check_key_data(data: &Value) -> Result<()> {
    let o = data
        .as_object()
        .ok_or_else(|| Error::bad_json("Key data must be an object"))?;
    let ok = o.get("first_message_index").is_some_and(Value::is_u64)
        && o.get("forwarded_count").is_some_and(Value::is_u64)
        && o.get("is_verified").is_some_and(Value::is_boolean)
        && o.get("session_data").is_some_and(Value::is_object);
    if !ok {
        return Err(Error::bad_json(
            "Key data needs first_message_index, forwarded_count, is_verified and session_data",
        ));
    }
    if serde_json::to_vec(data)?.len() > MAX_RECORD_BYTES {
        return Err(Error::new(ErrCode::TooLarge, "Key data is too large"));
    }
    Ok(())
}

/// The spec's rule: a verified key beats an unverified one; then the lower first message
/// index; then the lower forwarded count. Otherwise the stored key stays.
fn replaces(old: &Value, new: &Value) -> bool {
    let verified = |v: &Value| v["is_verified"].as_bool().unwrap_or(false);
    let index = |v: &Value| v["first_message_index"].as_u64().unwrap_or(u64::MAX);
    let forwarded = |v: &Value| v["forwarded_count"].as_u64().unwrap_or(u64::MAX);
    if verified(new) != verified(old) {
        return verified(new);
    }
    if index(new) != index(old) {
        return index(new) < index(old);
    }
    forwarded(new) < forwarded(old)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::replaces;

    #[test]
    fn replacement_rule() {
        let k = |v: bool, i: u64, f: u64| json!({ "is_verified": v, "first_message_index": i, "forwarded_count": f, "session_data": {} });
        assert!(replaces(&k(false, 0, 0), &k(true, 5, 5)));
        assert!(!replaces(&k(true, 5, 5), &k(false, 0, 0)));
        assert!(replaces(&k(true, 5, 0), &k(true, 4, 9)));
        assert!(!replaces(&k(true, 4, 9), &k(true, 5, 0)));
        assert!(replaces(&k(true, 4, 9), &k(true, 4, 8)));
        assert!(!replaces(&k(true, 4, 8), &k(true, 4, 8)));
    }
}
