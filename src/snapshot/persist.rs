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
