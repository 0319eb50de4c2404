//! What of a host's error a tenant may read.
//!
//! Host agents explain failures in their own terms: paths under the data
//! directory, process IDs, socket names. Those help an operator and tell a
//! tenant how the fleet is laid out, so the API (502 messages and a
//! sandbox's `failure_reason`) carries the message with them masked, and
//! the server's log keeps the original.

/// `message` with host file paths and process IDs masked.
pub fn host_detail(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut pid_next = false;
    for (i, word) in message.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let lead = word.len() - word.trim_start_matches(['(', '"', '\'', '[', '=']).len();
        let (prefix, rest) = word.split_at(lead);
        let body = rest.trim_end_matches([')', '"', '\'', ']', ',', ':', ';', '.']);
        let suffix = &rest[body.len()..];
        let masked = if is_host_path(body) {
            Some("<host path>")
        } else if pid_next && !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
            Some("<n>")
        } else {
            None
        };
        match masked {
            Some(m) => {
                out.push_str(prefix);
                out.push_str(m);
                out.push_str(suffix);
            }
            None => out.push_str(word),
        }
        let lower = body.to_ascii_lowercase();
        pid_next = lower == "pid" || lower == "process";
    }
    out
}

/// An absolute path with at least two components (`/x` alone, such as a
/// ratio or a lone slash, is left alone).
fn is_host_path(s: &str) -> bool {
    s.starts_with('/') && s.len() > 1 && s[1..].contains('/') && !s.starts_with("//")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_pids_are_masked_and_the_rest_kept() {
        assert_eq!(
            host_detail(
                "spawning qemu: /var/lib/ember/run/sb-abc/qmp.sock: No such file (pid 4242)"
            ),
            "spawning qemu: <host path>: No such file (pid <n>)"
        );
        assert_eq!(
            host_detail("VMM exited with signal 9"),
            "VMM exited with signal 9"
        );
        assert_eq!(
            host_detail("process 17 died; see \"/run/ember/x.log\"."),
            "process <n> died; see \"<host path>\"."
        );
        assert_eq!(
            host_detail("create failed on host host-1: http://10.0.0.2:7001 refused, 1/2 tries"),
            "create failed on host host-1: http://10.0.0.2:7001 refused, 1/2 tries"
        );
        assert_eq!(host_detail(""), "");
        assert_eq!(host_detail("/ alone"), "/ alone");
    }
}
