//! The channel declarations shared by the app and the worker (the seed's `channels.ts`).
//!
//! Both processes link this module, so a producer and a consumer can never disagree on a
//! channel's name, message type or options.

use queue_core::channel;
use serde::{Deserialize, Serialize};

/// A user signed up. Produced by the app's `POST /users`, consumed by
/// [`save_user`](crate::consumers::save_user).
///
/// Exactly once with a 1 s dedup window: the same user posted twice within a second is
/// stored once, and the second produce answers the first one's message id.
#[channel("user/registered", exactly_once, dedup = "1s")]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    /// The user's id.
    pub id: u64,
    /// The user's name.
    pub username: String,
}

/// A welcome mail to send, produced by [`save_user`](crate::consumers::save_user) once the
/// user is stored and consumed by [`send_welcome_mail`](crate::consumers::send_welcome_mail).
///
/// The mail carries the id of the registration message it answers, so a redelivery of that
/// message (a worker died after producing the mail but before acking the user) produces an
/// equal payload, which the 10 minute dedup window drops; a new registration gets a new mail.
#[channel("mail/welcome", exactly_once, dedup = "10m", max_attempts = 5)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WelcomeMail {
    /// The id of the `UserRegistered` message this mail answers.
    pub registration: u64,
    /// The user the mail goes to.
    pub user_id: u64,
    /// The name in the greeting.
    pub username: String,
}
