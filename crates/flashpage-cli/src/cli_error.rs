//! CLI errors: a message and an exit status (2 invalid input, 1 other failures).

/// An error to print as `error: {message}` and exit with `code`.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    /// Invalid input: exit status 2.
    pub fn invalid(message: impl Into<String>) -> Self {
        CliError {
            code: 2,
            message: message.into(),
        }
    }
    /// `Ok` when no case failed, else one failure naming every failed case (exit status 1).
    pub fn from_failures(failures: &[String]) -> Result<(), CliError> {
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CliError::failure(format!(
                "{} case(s) failed: {}",
                failures.len(),
                failures.join("; ")
            )))
        }
    }

    /// Any other failure: exit status 1.
    pub fn failure(message: impl Into<String>) -> Self {
        CliError {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<flashpage::Error> for CliError {
    fn from(e: flashpage::Error) -> Self {
        CliError {
            code: if e.is_invalid_input() { 2 } else { 1 },
            message: e.to_string(),
        }
    }
}
