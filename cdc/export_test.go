package cdc

// TextValues makes s read and apply values in text form, as it does for a
// column type without a built-in binary form.
func TextValues(s *Sync) { s.textValues = true }

// BinaryValues reports whether the running s reads values in binary.
func BinaryValues(s *Sync) bool { return s.binary.Load() }
