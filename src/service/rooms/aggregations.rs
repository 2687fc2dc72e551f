//! Server-side aggregation of relations, bundled into `unsigned.m.relations` of every event a
//! client receives: the thread summary (`m.thread`), the latest edit (`m.replace`) and the
//! references (`m.reference`).
//!
//! Thread summaries are kept up to date at write time (`threads.rs`), so a thread of any length
//! costs one read. Edits and references come from the relations index (`relations.rs`), read
//! newest first: the latest edit is found however many reactions came before it.

use ruma::{RoomId, UserId};
use serde_json::{json, Map, Value};

use super::{relations::Child, Pdu, Rooms};
use crate::{
    error::Result,
    storage::{keys, Table},
};

/// Most children of one event looked at for its edits and references.
const MAX_CHILDREN: usize = 1000;
/// Most references listed.
const MAX_REFERENCES: usize = 100;

/// A thread's summary for one user.
pub struct ThreadSummary {
    pub count: u64,
    pub latest: Option<String>,
    pub participated: bool,
}

impl Rooms {
    /// The children of `parent` in `room_id` from the index, newest first (at most
    /// [`MAX_CHILDREN`] index entries looked at).
    fn children_newest_first(&self, parent: &str, room_id: &RoomId) -> Result<Vec<Child>> {
        let prefix = keys::prefix(&[parent]);
        let mut upper = prefix.clone();
        upper.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_from(Table::Relations, &prefix, &upper, true)?
            .take(MAX_CHILDREN)
        {
            let (_, v) = entry?;
            let Ok(child) = serde_json::from_slice::<Child>(&v) else {
                continue;
            };
            if self.child_in_room(&child, room_id)? {
                out.push(child);
            }
        }
        Ok(out)
    }

    /// The sender of a child (older index entries do not carry it).
    fn child_sender(&self, child: &Child) -> Result<String> {
        if !child.sender.is_empty() {
            return Ok(child.sender.clone());
        }
        Ok(self
            .pdu(&child.event_id)?
            .map(|p| p.sender.to_string())
            .unwrap_or_default())
    }

    /// The thread rooted at `root`, as `user` sees it (count, latest reply, took part).
    pub fn thread_summary(&self, root: &Pdu, user: &UserId) -> Result<ThreadSummary> {
        let stored = match &root.room_id {
            Some(room) => self.thread_record(room, root.event_id.as_str())?,
            None => None,
        };
        Ok(match stored {
            Some(t) => ThreadSummary {
                count: t.count,
                participated: root.sender == user || t.senders.iter().any(|s| s == user.as_str()),
                latest: Some(t.latest_event),
            },
            None => ThreadSummary {
                count: 0,
                latest: None,
                participated: root.sender == user,
            },
        })
    }

    /// `unsigned.m.relations` for `pdu` as `user` sees it, or None when nothing relates to it.
    pub fn bundled_relations(&self, pdu: &Pdu, user: &UserId) -> Result<Option<Value>> {
        // Most events have no children: one seek says so.
        if is_redacted(pdu)
            || self
                .storage
                .scan_prefix(Table::Relations, &keys::prefix(&[pdu.event_id.as_str()]))?
                .next()
                .is_none()
        {
            return Ok(None);
        }
        let Some(room_id) = pdu.room_id.clone() else {
            return Ok(None);
        };
        let mut out = Map::new();
        let thread = self.thread_summary(pdu, user)?;
        if let Some(latest) = &thread.latest {
            if let Some(latest) = self.pdu(latest)? {
                let mut latest_event = latest.to_client_value(None);
                // The latest reply shows its own latest edit.
                if let Some(edit) = self.latest_edit(&latest, &room_id)? {
                    latest_event["unsigned"]["m.relations"] =
                        json!({ "m.replace": edit.to_client_value(None) });
                }
                out.insert(
                    "m.thread".into(),
                    json!({
                        "latest_event": latest_event,
                        "count": thread.count,
                        "current_user_participated": thread.participated,
                    }),
                );
            }
        }
        let children = self.children_newest_first(pdu.event_id.as_str(), &room_id)?;
        if let Some(edit) = self.latest_edit_of(pdu, &children)? {
            out.insert("m.replace".into(), edit.to_client_value(None));
        }
        let mut references: Vec<Value> = children
            .iter()
            .filter(|c| c.rel_type == "m.reference")
            .take(MAX_REFERENCES)
            .map(|c| json!({ "event_id": c.event_id }))
            .collect();
        references.reverse();
        if !references.is_empty() {
            out.insert("m.reference".into(), json!({ "chunk": references }));
        }
        Ok((!out.is_empty()).then_some(Value::Object(out)))
    }

    fn latest_edit(&self, pdu: &Pdu, room_id: &RoomId) -> Result<Option<Pdu>> {
        let children = self.children_newest_first(pdu.event_id.as_str(), room_id)?;
        self.latest_edit_of(pdu, &children)
    }

    /// The newest valid edit among `children` (newest first): only the original sender's edits
    /// of the same event type count.
    fn latest_edit_of(&self, pdu: &Pdu, children: &[Child]) -> Result<Option<Pdu>> {
        let kind = pdu.kind.to_string();
        for child in children {
            if child.rel_type == "m.replace"
                && child.kind == kind
                && self.child_sender(child)? == pdu.sender.as_str()
            {
                return self.pdu(&child.event_id);
            }
        }
        Ok(None)
    }
}

fn is_redacted(pdu: &Pdu) -> bool {
    pdu.unsigned
        .as_ref()
        .is_some_and(|u| u.contains_key("redacted_because"))
}
