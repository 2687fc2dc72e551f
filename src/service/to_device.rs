//! Send-to-device messages: a per-device inbox. A message gets a stream count when it is sent,
//! is delivered by every sync until the device acknowledges it (by syncing with a token at or
//! after that count), and is deleted then. Transaction ids make a retried send deliver once.

use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    error::{ErrCode, Error, Result},
    service::globals::Globals,
    storage::{keys, Batch, Storage, Table},
};

/// Most messages one sync response carries for a device; the rest follow in the next sync.
pub const MAX_PER_SYNC: usize = 100;
/// Most recipients (devices after expanding `*`) of one request.
pub const MAX_RECIPIENTS: usize = 10_000;
/// Largest content of one message.
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;

#[derive(Serialize, Deserialize)]
struct Stored {
    sender: OwnedUserId,
    #[serde(rename = "type")]
    kind: String,
    content: Value,
}

pub struct ToDevice {
    storage: Storage,
    globals: std::sync::Arc<Globals>,
    /// The closed user groups (who may contact whom) and the audit log for refusals: every
    /// message written here, from this server's users or from other servers, passes them.
    policy: Option<(
        std::sync::Arc<crate::policy::groups::Groups>,
        std::sync::Arc<crate::policy::audit::AuditLog>,
    )>,
}

/// Where one message goes.
pub struct Recipient {
    pub user: OwnedUserId,
    pub device: OwnedDeviceId,
    pub content: Value,
}

/// The recipients one `messages` entry (user, device or `*`, content) stands for: `*` is every
/// device the local user has.
pub fn recipients_for(
    accounts: &crate::service::accounts::Accounts,
    user: &ruma::UserId,
    device: &str,
    content: &Value,
    out: &mut Vec<Recipient>,
) -> crate::error::Result<()> {
    if device == "*" {
        for d in accounts.devices(user)? {
            out.push(Recipient {
                user: user.to_owned(),
                device: d.device_id.clone(),
                content: content.clone(),
            });
        }
    } else {
        out.push(Recipient {
            user: user.to_owned(),
            device: device.into(),
            content: content.clone(),
        });
    }
    Ok(())
}

impl ToDevice {
    pub fn new(storage: Storage, globals: std::sync::Arc<Globals>) -> ToDevice {
        ToDevice {
            storage,
            globals,
            policy: None,
        }
    }

    /// Apply the closed user groups to every message (refusals audited in `audit`).
    pub fn with_policy(
        mut self,
        groups: std::sync::Arc<crate::policy::groups::Groups>,
        audit: std::sync::Arc<crate::policy::audit::AuditLog>,
    ) -> ToDevice {
        self.policy = Some((groups, audit));
        self
    }

    /// May `sender` send to-device messages to `target` under the closed user groups? For
    /// other servers' messages, whose recipients that may not be reached are left out.
    pub fn may_contact(&self, sender: &UserId, target: &UserId) -> bool {
        self.policy
            .as_ref()
            .is_none_or(|(groups, _)| groups.may_contact(sender, target))
    }

    /// Refuse (403, audited) a request with a recipient `sender` may not contact: the local
    /// recipients and `others` (users of other servers the request also goes to).
    fn check_contact(
        &self,
        sender: &UserId,
        recipients: &[Recipient],
        others: &[&UserId],
    ) -> Result<()> {
        let Some((groups, audit)) = &self.policy else {
            return Ok(());
        };
        crate::policy::access::check_to_device(
            groups,
            audit,
            sender,
            recipients
                .iter()
                .map(|r| &*r.user)
                .chain(others.iter().copied()),
        )
    }

    /// Store the messages of one request, unless this transaction was already done.
    pub fn send(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        kind: &str,
        recipients: Vec<Recipient>,
    ) -> Result<()> {
        self.send_with(sender, sender_device, txn_id, kind, recipients, &[], |_| {
            Ok(())
        })?;
        Ok(())
    }

    /// [`ToDevice::send`], with `extra` writing more into the same batch (the messages for other
    /// servers, queued for federation). Returns false when the transaction was already done
    /// (nothing was written). `remote_targets`: the users of other servers `extra` sends to,
    /// checked against the closed user groups with the local recipients.
    #[allow(clippy::too_many_arguments)]
    pub fn send_with(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        kind: &str,
        recipients: Vec<Recipient>,
        remote_targets: &[&UserId],
        extra: impl FnOnce(&mut Batch) -> Result<()>,
    ) -> Result<bool> {
        if recipients.len() > MAX_RECIPIENTS {
            return Err(Error::new(
                ErrCode::TooLarge,
                format!("At most {MAX_RECIPIENTS} devices per request"),
            ));
        }
        // Its own namespace in the transactions table: four parts, where room sends use three.
        let txn_key = keys::join(&[sender.as_str(), sender_device.as_str(), "to_device", txn_id]);
        if self.storage.contains(Table::Transactions, &txn_key)? {
            return Ok(false);
        }
        // After the transaction check: a retry of a request that went through stays a success.
        self.check_contact(sender, &recipients, remote_targets)?;
        let pending = self.globals.counter.next()?;
        let count = pending.get();
        let mut b = self.storage.batch();
        let mut wake: Vec<OwnedUserId> = Vec::new();
        for r in recipients {
            let stored = Stored {
                sender: sender.to_owned(),
                kind: kind.to_owned(),
                content: r.content,
            };
            let body = serde_json::to_vec(&stored)?;
            if body.len() > MAX_CONTENT_BYTES {
                return Err(Error::new(
                    ErrCode::TooLarge,
                    "Message content is too large",
                ));
            }
            // One count per request; the sender device and a sequence keep keys apart.
            b.put(
                Table::ToDevice,
                &inbox_key(&r.user, &r.device, count, sender, sender_device),
                &body,
            )?;
            if !wake.contains(&r.user) {
                wake.push(r.user);
            }
        }
        b.put(Table::Transactions, &txn_key, b"")?;
        extra(&mut b)?;
        b.commit()?;
        pending.finish(wake);
        Ok(true)
    }

    /// Delete the device's messages with counts up to `acknowledged`.
    pub fn acknowledge(&self, user: &UserId, device: &DeviceId, acknowledged: u64) -> Result<()> {
        let prefix = keys::prefix(&[user.as_str(), device.as_str()]);
        let mut b = self.storage.batch();
        for entry in self
            .storage
            .scan_prefix(Table::ToDevice, &prefix)?
            .take(10_000)
        {
            let (k, _) = entry?;
            match message_count(&k, prefix.len()) {
                Some(c) if c <= acknowledged => b.delete(Table::ToDevice, &k)?,
                _ => break,
            }
        }
        if !b.is_empty() {
            b.commit()?;
        }
        Ok(())
    }

    /// Up to `limit` (at most `MAX_PER_SYNC`) messages with counts up to `up_to`, oldest first,
    /// with the count of the last one and whether more are waiting.
    pub fn pending(
        &self,
        user: &UserId,
        device: &DeviceId,
        up_to: u64,
        limit: usize,
    ) -> Result<(Vec<Value>, Option<u64>, bool)> {
        let limit = limit.clamp(1, MAX_PER_SYNC);
        let prefix = keys::prefix(&[user.as_str(), device.as_str()]);
        let mut events = Vec::new();
        let mut last = None;
        let mut more = false;
        for entry in self.storage.scan_prefix(Table::ToDevice, &prefix)? {
            let (k, v) = entry?;
            let Some(count) = message_count(&k, prefix.len()) else {
                continue;
            };
            if count > up_to {
                break;
            }
            if events.len() >= limit {
                more = true;
                break;
            }
            let stored: Stored = serde_json::from_slice(&v)?;
            events.push(json!({
                "sender": stored.sender,
                "type": stored.kind,
                "content": stored.content,
            }));
            last = Some(count);
        }
        Ok((events, last, more))
    }
}

/// `user 0xff device 0xff count(8) sender 0xff sender_device`: ordered by count per device.
fn inbox_key(
    user: &UserId,
    device: &DeviceId,
    count: u64,
    sender: &UserId,
    sender_device: &DeviceId,
) -> Vec<u8> {
    let mut k = keys::with_count(&[user.as_str(), device.as_str()], count);
    k.extend_from_slice(&keys::join(&[sender.as_str(), sender_device.as_str()]));
    k
}

fn message_count(key: &[u8], prefix_len: usize) -> Option<u64> {
    let bytes = key.get(prefix_len..prefix_len + 8)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}
