package state

// Internals the external tests (package state_test, which may import
// testenv, which imports state) look at.

const MaxFileSize = maxFileSize

// ProcState is field 3 of /proc/PID/stat, 0 if unreadable.
func ProcState(pid int) byte {
	st, err := readStat(pid)
	if err != nil {
		return 0
	}
	return st.state
}
