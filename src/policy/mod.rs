//! The policy layer: every decision the law makes goes through here, at fixed hook points.
//! Today it holds the privacy-protective defaults the config sets; closed user groups, the
//! federation allow-list, retention and the audit log arrive with the compliance issue and plug
//! into these same hooks.

use ruma::UserId;

use crate::{
    config::Config,
    error::{Error, Result},
};

pub struct Policy {
    allow_presence: bool,
    allow_public_room_directory: bool,
}

impl Policy {
    pub fn new(config: &Config) -> Policy {
        Policy {
            allow_presence: config.allow_presence,
            allow_public_room_directory: config.allow_public_room_directory,
        }
    }

    /// Presence is personal data: only shared when the operator turned it on.
    pub fn presence_enabled(&self) -> bool {
        self.allow_presence
    }

    /// May `user` publish a room in the directory?
    pub fn may_publish_room(&self, _user: &UserId) -> Result<()> {
        if self.allow_public_room_directory {
            Ok(())
        } else {
            Err(Error::forbidden(
                "Publishing rooms is disabled on this server",
            ))
        }
    }
}
