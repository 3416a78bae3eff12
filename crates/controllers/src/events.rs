//! Controller Events: the shared recorder of `skiff-events`, plus how a failed API request reads
//! in an Event.

pub use skiff_events::{NORMAL, Recorder, WARNING, reference};

/// The message of a failed request as an Event shows it (the API's Status message when there
/// is one).
pub fn api_message(e: &crate::ControllerError) -> String {
    match e {
        crate::ControllerError::Kube(kube::Error::Api(s)) => s.message.clone(),
        other => other.to_string(),
    }
}
