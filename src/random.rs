//! Bytes from the host's random number generator, for what must differ from VM to VM
//! (MAC addresses, VM generation IDs, the entropy a restored clone is reseeded with).

use std::io;

/// Fills `buf` from `getrandom(2)`, blocking until the host's pool is initialised and
/// retrying interrupted calls. Failure is an error, never a predictable fallback.
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which is valid
        // for writes of that length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fills_every_byte_with_fresh_values() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        super::fill(&mut a).unwrap();
        super::fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
        super::fill(&mut []).unwrap();
    }
}
