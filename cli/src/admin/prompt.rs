//! Reading what must not be typed on the command line: passwords (from the terminal without
//! echo, or from standard input for scripts) and, when missing, an email address.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

/// Longest password accepted from standard input; more is surely not a password.
pub(crate) const MAX_PASSWORD_BYTES: usize = 4096;

/// Reads a password from standard input (`--password-stdin`): the first line, without its
/// line ending.
pub(crate) fn password_from_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take_line(&mut line)
        .map_err(|e| anyhow::anyhow!("cannot read the password from standard input: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    anyhow::ensure!(
        !password.is_empty(),
        "no password on standard input (--password-stdin reads its first line)"
    );
    Ok(password)
}

/// Asks for a password on the terminal without echoing it.
pub(crate) fn password_from_terminal(prompt: &str) -> anyhow::Result<String> {
    let password = rpassword::prompt_password(prompt).map_err(|e| {
        anyhow::anyhow!(
            "cannot read a password from the terminal ({e}): pipe it in with --password-stdin"
        )
    })?;
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    Ok(password)
}

/// Asks for a new password twice on the terminal and checks that both match.
pub(crate) fn new_password_from_terminal() -> anyhow::Result<String> {
    let first = password_from_terminal("New password: ")?;
    let second = password_from_terminal("Repeat the new password: ")?;
    anyhow::ensure!(
        first == second,
        "the two passwords differ; nothing was changed"
    );
    Ok(first)
}

/// Asks for an email address on the terminal (only when standard input is one).
pub(crate) fn email_from_terminal() -> anyhow::Result<String> {
    anyhow::ensure!(
        std::io::stdin().is_terminal(),
        "no email address: pass --email EMAIL"
    );
    eprint!("Email: ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take_line(&mut line)
        .map_err(|e| anyhow::anyhow!("cannot read the email address: {e}"))?;
    let email = line.trim().to_owned();
    anyhow::ensure!(!email.is_empty(), "no email address given");
    Ok(email)
}

/// Reads one bounded line.
trait TakeLine {
    fn take_line(&mut self, line: &mut String) -> std::io::Result<()>;
}

impl<R: std::io::BufRead> TakeLine for R {
    fn take_line(&mut self, line: &mut String) -> std::io::Result<()> {
        let mut limited = std::io::Read::take(self, MAX_PASSWORD_BYTES as u64 + 2);
        limited.read_line(line)?;
        if line.len() > MAX_PASSWORD_BYTES + 1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the line is longer than {MAX_PASSWORD_BYTES} bytes"),
            ));
        }
        Ok(())
    }
}
