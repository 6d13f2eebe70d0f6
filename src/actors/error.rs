//! [`ActorError`]: an actor could not be reached or did not answer. It is not a storage
//! failure, and callers tell them apart (both answer 503 over HTTP, with different details).

use actix::MailboxError;

/// A message to an actor did not get an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActorError {
    /// The actor has stopped (its mailbox closed); it is started again on the next message.
    #[error("the {0} actor is restarting; retry")]
    Stopped(&'static str),
    /// The actor did not answer within the caller's timeout.
    #[error("the {0} actor did not answer in time; retry")]
    Timeout(&'static str),
    /// The actor is alive but cannot serve yet (its state is still loading).
    #[error("the {0} actor is not ready yet; retry")]
    NotReady(&'static str),
    /// The actor gave up on the request before answering (its reply channel was dropped).
    #[error("the {0} actor abandoned the request; retry")]
    Abandoned(&'static str),
}

impl ActorError {
    /// The error for a failed `send` to the `actor` named (for people: "incident", "unit", …).
    pub fn mailbox(actor: &'static str) -> impl Fn(MailboxError) -> ActorError {
        move |e| match e {
            MailboxError::Closed => ActorError::Stopped(actor),
            MailboxError::Timeout => ActorError::Timeout(actor),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_errors_name_the_actor() {
        let closed = ActorError::mailbox("incident")(MailboxError::Closed);
        assert_eq!(closed, ActorError::Stopped("incident"));
        assert_eq!(
            closed.to_string(),
            "the incident actor is restarting; retry"
        );
        let late = ActorError::mailbox("unit")(MailboxError::Timeout);
        assert_eq!(
            late.to_string(),
            "the unit actor did not answer in time; retry"
        );
    }
}
