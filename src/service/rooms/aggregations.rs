//! Server-side aggregation of relations, bundled into `unsigned.m.relations` of every event a
//! client receives: the thread summary (`m.thread`), the latest edit (`m.replace`) and the
//! references (`m.reference`).
//!
//! Thread summaries are kept up to date at write time (`threads.rs`), so a thread of any length
//! costs one read. Edits and references come from the relations index (`relations.rs`), read
//! newest first: the latest edit is found however many reactions came before it.
//!
//! What is bundled obeys history visibility as the events themselves do (`visibility.rs`): a
//! reader sees the latest reply, edit and references *they* may see, and a thread's count of
//! the replies they may see. So a user who left (or was kicked, or joined a `joined` room late)
//! learns nothing of replies and edits sent outside their window through the root. The stored
//! summary is used as it is when nothing about the reader's visibility changes between the
//! root and the latest reply; otherwise the summary is counted from the visible replies among
//! the newest [`MAX_CHILDREN`] children.

use ruma::{RoomId, UserId};
use serde_json::{json, Map, Value};

use super::{
    relations::Child,
    visibility::{At, Viewer},
    Pdu, Rooms,
};
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
    fn children_newest_first(&self, parent: &str, room_id: &RoomId) -> Result<Vec<(u64, Child)>> {
        let prefix = keys::prefix(&[parent]);
        let mut upper = prefix.clone();
        upper.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_from(Table::Relations, &prefix, &upper, true)?
            .take(MAX_CHILDREN)
        {
            let (k, v) = entry?;
            let (Some(count), Ok(child)) =
                (keys::count_suffix(&k), serde_json::from_slice::<Child>(&v))
            else {
                continue;
            };
            if self.child_in_room(&child, room_id)? {
                out.push((count, child));
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

    /// Did `user` take part in the thread rooted at `root` (sent the root or a reply)?
    pub fn thread_participated(&self, root: &Pdu, user: &UserId) -> Result<bool> {
        if root.sender == user {
            return Ok(true);
        }
        let stored = match &root.room_id {
            Some(room) => self.thread_record(room, root.event_id.as_str())?,
            None => None,
        };
        Ok(stored.is_some_and(|t| t.senders.iter().any(|s| s == user.as_str())))
    }

    /// The thread rooted at `root` as the viewer may see it: the stored summary when every
    /// reply is judged alike for them (nothing about their visibility changes between the root
    /// and the latest reply, which they may see), else counted from the visible replies among
    /// the root's children (newest first; read here when not given). None when the viewer
    /// may see no reply.
    pub(super) fn visible_thread(
        &self,
        root: &Pdu,
        room_id: &RoomId,
        viewer: &mut Viewer<'_>,
        children: Option<&[(u64, Child)]>,
    ) -> Result<Option<ThreadSummary>> {
        let Some(stored) = self.thread_record(room_id, root.event_id.as_str())? else {
            return Ok(None);
        };
        let user = viewer.user().to_owned();
        let participated = root.sender == user || stored.senders.iter().any(|s| s == user.as_str());
        let root_count = self.event_meta(root.event_id.as_str())?.map(|m| m.count);
        if let (Some(root_count), Some(latest)) = (root_count, self.pdu(&stored.latest_event)?) {
            if viewer.unchanged_between(root_count, stored.latest)?
                && viewer.can_see(&latest, At::Stream(stored.latest))?
            {
                return Ok(Some(ThreadSummary {
                    count: stored.count,
                    latest: Some(stored.latest_event),
                    participated,
                }));
            }
        }
        let read;
        let children = match children {
            Some(c) => c,
            None => {
                read = self.children_newest_first(root.event_id.as_str(), room_id)?;
                &read
            }
        };
        let mut count = 0u64;
        let mut latest = None;
        for (at, child) in children {
            if child.rel_type == "m.thread" && viewer.can_see_child(child, *at)? {
                count += 1;
                if latest.is_none() {
                    latest = Some(child.event_id.clone());
                }
            }
        }
        Ok((count > 0).then_some(ThreadSummary {
            count,
            latest,
            participated,
        }))
    }

    /// `unsigned.m.relations` for `pdu` as `user` sees it, or None when nothing they may see
    /// relates to it.
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
        let mut viewer = self.viewer(&room_id, user);
        let mut out = Map::new();
        let children = self.children_newest_first(pdu.event_id.as_str(), &room_id)?;
        let thread = self.visible_thread(pdu, &room_id, &mut viewer, Some(&children))?;
        if let Some(thread) = thread {
            let latest = match thread.latest.as_deref() {
                Some(id) => self.pdu(id)?,
                None => None,
            };
            if let Some(latest) = latest {
                let mut latest_event = latest.to_client_value(None);
                // The latest reply shows its own latest edit (one the reader may see).
                let replies_children =
                    self.children_newest_first(latest.event_id.as_str(), &room_id)?;
                if let Some(edit) = self.latest_edit_of(&latest, &replies_children, &mut viewer)? {
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
        if let Some(edit) = self.latest_edit_of(pdu, &children, &mut viewer)? {
            out.insert("m.replace".into(), edit.to_client_value(None));
        }
        let mut references: Vec<Value> = Vec::new();
        for (count, child) in &children {
            if references.len() >= MAX_REFERENCES {
                break;
            }
            if child.rel_type == "m.reference" && viewer.can_see_child(child, *count)? {
                references.push(json!({ "event_id": child.event_id }));
            }
        }
        references.reverse();
        if !references.is_empty() {
            out.insert("m.reference".into(), json!({ "chunk": references }));
        }
        Ok((!out.is_empty()).then_some(Value::Object(out)))
    }

    /// The newest valid edit among `children` (newest first) that the viewer may see: only the
    /// original sender's edits of the same event type count.
    fn latest_edit_of(
        &self,
        pdu: &Pdu,
        children: &[(u64, Child)],
        viewer: &mut Viewer<'_>,
    ) -> Result<Option<Pdu>> {
        let kind = pdu.kind.to_string();
        for (count, child) in children {
            if child.rel_type == "m.replace"
                && child.kind == kind
                && self.child_sender(child)? == pdu.sender.as_str()
                && viewer.can_see_child(child, *count)?
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
