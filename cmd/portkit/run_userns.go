package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"syscall"
)

// idRange is one line of /etc/subuid or /etc/subgid.
type idRange struct{ start, count int }

// subIDs finds the first range of name (or its numeric id) in file.
func subIDs(file, name string, id int) (idRange, bool) {
	f, err := os.Open(file)
	if err != nil {
		return idRange{}, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.Split(strings.TrimSpace(sc.Text()), ":")
		if len(parts) != 3 || (parts[0] != name && parts[0] != strconv.Itoa(id)) {
			continue
		}
		start, err1 := strconv.Atoi(parts[1])
		count, err2 := strconv.Atoi(parts[2])
		if err1 == nil && err2 == nil && count > 0 {
			return idRange{start, count}, true
		}
	}
	return idRange{}, false
}

// idMapping says how the child user namespace is mapped: by the kernel at
// clone (Go's UidMappings: root, or a single ID) or afterwards by the setuid
// helpers newuidmap/newgidmap with the caller's subordinate ranges.
type idMapping struct {
	uid, gid       int
	subUID, subGID idRange
	helpers        bool // newuidmap/newgidmap with the ranges
}

func planIDMapping() idMapping {
	m := idMapping{uid: os.Geteuid(), gid: os.Getegid()}
	if m.uid == 0 {
		return m
	}
	name := ""
	if u, err := user.LookupId(strconv.Itoa(m.uid)); err == nil {
		name = u.Username
	}
	su, okU := subIDs("/etc/subuid", name, m.uid)
	sg, okG := subIDs("/etc/subgid", name, m.uid)
	_, errU := exec.LookPath("newuidmap")
	_, errG := exec.LookPath("newgidmap")
	if okU && okG && errU == nil && errG == nil {
		m.subUID, m.subGID, m.helpers = su, sg, true
	}
	return m
}

// apply sets the clone-time mappings on attr when no helper is used.
func (m idMapping) apply(attr *syscall.SysProcAttr) {
	if m.helpers {
		return
	}
	if m.uid == 0 {
		// Root maps every ID onto itself, as RootlessKit does for root.
		attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 4294967295}}
		attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 4294967295}}
		attr.GidMappingsEnableSetgroups = true
		return
	}
	attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: m.uid, Size: 1}}
	attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: m.gid, Size: 1}}
}

// mapChild runs newuidmap/newgidmap on pid when the mapping needs them.
func (m idMapping) mapChild(pid int) error {
	if !m.helpers {
		return nil
	}
	for _, h := range []struct {
		tool string
		id   int
		sub  idRange
		file string
	}{
		{"newuidmap", m.uid, m.subUID, "/etc/subuid"},
		{"newgidmap", m.gid, m.subGID, "/etc/subgid"},
	} {
		args := []string{strconv.Itoa(pid), "0", strconv.Itoa(h.id), "1", "1", strconv.Itoa(h.sub.start), strconv.Itoa(h.sub.count)}
		out, err := exec.Command(h.tool, args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s %s: %w: %s (check the range in %s and that %s is setuid root)",
				h.tool, strings.Join(args, " "), err, strings.TrimSpace(string(out)), h.file, h.tool)
		}
	}
	return nil
}
