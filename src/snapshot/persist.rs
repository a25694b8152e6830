//! The one save/restore pair every stateful component implements. No
//! default methods: a component that forgets its state does not compile.

/// `save` reads the component's state while the VM is paused; `restore`
/// puts it back in place (the same path serves revert, restore in a new
/// process and fuzz resets). State read from a file is untrusted: `restore`
/// validates it and fails with a message instead of panicking.
pub trait Persist {
    type State;
    fn save(&self) -> Self::State;
    fn restore(&mut self, state: &Self::State) -> Result<(), String>;
}

/// Save, restore into a fresh component, save again: the two saves must be
/// equal (crosvm's snapshot-restore-snapshot, per device). Catches a field
/// that `save` writes and `restore` drops, or the reverse.
#[cfg(test)]
pub(crate) fn assert_save_restore_save<P: Persist>(original: &P, fresh: &mut P)
where
    P::State: PartialEq + std::fmt::Debug,
{
    let saved = original.save();
    fresh.restore(&saved).expect("a state just saved restores");
    assert_eq!(fresh.save(), saved);
}
