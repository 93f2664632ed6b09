//! The consumers (the seed's `worker.ts` callbacks). A [`queue_runtime::Worker`] in any
//! binary that links this crate runs both; each gets its dependencies injected as `Dep<T>`.
//!
//! A consumer that returns `Ok` acks its message; an `Err` retries it with backoff, and
//! after the channel's `max_attempts` the message moves to the dead-letter queue.

use anyhow::Context as _;
use queue_core::{Delivery, Dep, Queue, consumer};

use crate::channels::{UserRegistered, WelcomeMail};
use crate::services::{Database, Record};

/// Stores a registered user, then asks for a welcome mail.
///
/// Needs `Database` and the `Queue` (to produce the mail) from `Worker::provide`.
///
/// # Errors
/// When the database write or the mail's produce fails; the message is then retried.
#[consumer]
pub async fn save_user(
    delivery: Delivery<UserRegistered>,
    db: Dep<Database>,
    queue: Dep<Queue>,
) -> anyhow::Result<()> {
    let message_id = delivery.id();
    let attempt = delivery.attempt();
    let user = delivery.into_message();
    db.arc()
        .insert_async(Record::User {
            message_id: message_id.0,
            attempt,
            id: user.id,
            username: user.username.clone(),
        })
        .await
        .with_context(|| format!("storing user {}", user.id))?;
    tracing::info!(%message_id, attempt, user_id = user.id, username = %user.username, "user stored");
    let mail = WelcomeMail {
        registration: message_id.0,
        user_id: user.id,
        username: user.username,
    };
    WelcomeMail::produce(&queue, mail)
        .await
        .context("producing the welcome mail")?;
    Ok(())
}

/// "Sends" a welcome mail by recording it in the database.
///
/// # Errors
/// When the database write fails; the message is then retried.
#[consumer]
pub async fn send_welcome_mail(
    delivery: Delivery<WelcomeMail>,
    db: Dep<Database>,
) -> anyhow::Result<()> {
    let message_id = delivery.id();
    let mail = delivery.into_message();
    let text = format!("Welcome, {}!", mail.username);
    db.arc()
        .insert_async(Record::WelcomeMail {
            message_id: message_id.0,
            user_id: mail.user_id,
            text,
        })
        .await
        .with_context(|| format!("recording the welcome mail to user {}", mail.user_id))?;
    tracing::info!(%message_id, user_id = mail.user_id, "welcome mail sent");
    Ok(())
}
