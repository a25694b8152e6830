//! One line on why a booted kernel died early or said nothing, where it can
//! be known from outside: a kernel developer's kernel that prints nothing
//! otherwise leaves only "timed out" or "triple fault" to go on.

use super::{Outcome, Vmm};
use crate::arch::loader::KernelFormat;
use crate::config::KernelSource;

impl Vmm {
    /// The diagnosis for a run of a booted (not restored) kernel file that
    /// ended as `outcome`, if there is one to give.
    pub fn diagnosis(&self, outcome: &Outcome) -> Option<String> {
        let KernelSource::File(path) = &self.config.kernel else {
            return None;
        };
        diagnose(
            &path.display().to_string(),
            self.kernel_format?,
            &self.config.cmdline,
            self.console.printed_anything(),
            self.console.panic_line().as_deref(),
            outcome,
        )
    }
}

/// The rules, apart from the VMM so that each can be tested.
pub(crate) fn diagnose(
    kernel: &str,
    format: KernelFormat,
    cmdline: &str,
    printed: bool,
    panic: Option<&str>,
    outcome: &Outcome,
) -> Option<String> {
    let died = matches!(
        outcome,
        Outcome::Timeout(_) | Outcome::TripleFault { .. } | Outcome::Fatal(_) | Outcome::Reset
    );
    if !died || format == KernelFormat::TestGuest {
        return None;
    }
    if let Some(line) = panic {
        // A panic that rebooted is the outcome's own message already.
        if *outcome == Outcome::Reset
            || matches!(outcome, Outcome::Fatal(m) if m.contains(PANICKED))
        {
            return None;
        }
        let line = line.split("] ").last().unwrap_or(line);
        return Some(format!("{PANICKED}: {line}"));
    }
    if printed {
        return None;
    }
    let has_console = cmdline
        .split_whitespace()
        .any(|w| w.starts_with("console=") || w.starts_with("earlyprintk="));
    Some(if !has_console {
        "the kernel printed nothing and its command line has no console=: add console=ttyS0 \
         (rewind's serial port; earlyprintk=serial shows the earliest messages)"
            .to_string()
    } else if format == (KernelFormat::Elf { pvh_note: false }) {
        format!(
            "the kernel printed nothing: {kernel} is an ELF without a PVH note (Xen's \
             PHYS32_ENTRY, which a vmlinux built with CONFIG_PVH=y has) and not a bzImage, so \
             rewind could only enter it at its ELF entry point: is it an x86-64 Linux kernel?"
        )
    } else {
        "the kernel printed nothing on ttyS0: it needs CONFIG_SERIAL_8250=y and \
         CONFIG_SERIAL_8250_CONSOLE=y (guest-images/linux/rewind.config); earlyprintk=serial \
         shows what happens before the console is up"
            .to_string()
    })
}

const PANICKED: &str = "guest kernel panicked";

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NO_PVH: KernelFormat = KernelFormat::Elf { pvh_note: false };
    const PVH: KernelFormat = KernelFormat::Elf { pvh_note: true };

    fn d(
        format: KernelFormat,
        cmdline: &str,
        printed: bool,
        panic: Option<&str>,
        o: Outcome,
    ) -> Option<String> {
        diagnose("k", format, cmdline, printed, panic, &o)
    }

    #[test]
    fn says_what_is_missing() {
        let tf = || Outcome::TripleFault { cpu: 0 };
        let to = || Outcome::Timeout(Duration::from_secs(1));
        assert!(d(PVH, "quiet", false, None, tf())
            .unwrap()
            .contains("no console="));
        assert!(d(NO_PVH, "console=ttyS0", false, None, to())
            .unwrap()
            .contains("without a PVH note"));
        assert!(d(KernelFormat::BzImage, "console=ttyS0", false, None, tf())
            .unwrap()
            .contains("CONFIG_SERIAL_8250_CONSOLE"));
        let panic = "[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs";
        assert_eq!(
            d(PVH, "console=ttyS0", true, Some(panic), to()).unwrap(),
            "guest kernel panicked: Kernel panic - not syncing: VFS: Unable to mount root fs"
        );
        // A panic that rebooted says so itself; a kernel that printed is not
        // second-guessed; runs that ended well need nothing.
        assert_eq!(
            d(PVH, "console=ttyS0", true, Some(panic), Outcome::Reset),
            None
        );
        assert_eq!(d(PVH, "console=ttyS0", true, None, tf()), None);
        assert_eq!(d(NO_PVH, "", false, None, Outcome::Stopped), None);
        assert_eq!(d(NO_PVH, "", false, None, Outcome::GuestExit(0)), None);
        assert_eq!(d(KernelFormat::TestGuest, "", false, None, tf()), None);
    }
}
