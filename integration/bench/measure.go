package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// client is where measurement clients run: the host netns dialing
// 127.0.0.1, or a veth peer netns dialing the host's end of the veth.
type client struct {
	netns string // "" = the bench's own netns
	ip    string
}

func (c client) addr(port int) string { return net.JoinHostPort(c.ip, strconv.Itoa(port)) }

// enter moves the calling goroutine's thread into c's netns; leave moves it
// back and unlocks it. A thread that cannot go back stays locked, so Go
// discards it when the goroutine ends (or, if it is the main thread, parks it).
func (c client) enter() (leave func(), err error) {
	if c.netns == "" {
		return func() {}, nil
	}
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, err
	}
	f, err := os.Open(c.netns)
	if err != nil {
		orig.Close()
		return nil, err
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		orig.Close()
		return nil, fmt.Errorf("setns %s: %w", c.netns, err)
	}
	return func() {
		defer orig.Close()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
	}, nil
}

// command runs name in c's netns (nsenter --net; the bench is root then).
func (c client) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	if c.netns == "" {
		return exec.CommandContext(ctx, name, args...)
	}
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + c.netns, name}, args...)...)
}

type iperfResult struct {
	End struct {
		SumReceived struct {
			BitsPerSecond float64 `json:"bits_per_second"`
			LostPercent   float64 `json:"lost_percent"`
		} `json:"sum_received"`
	} `json:"end"`
	Error string `json:"error"`
}

// iperf runs an iperf3 client against port and returns the receiver's rate
// in bit/s and, for UDP, its loss in percent.
func iperf(c client, port int, secs int, args ...string) (bps, loss float64, err error) {
	// iperf3 -s serves one test at a time and may still be closing the last.
	for try := 0; ; try++ {
		bps, loss, err = iperfOnce(c, port, secs, args...)
		if err == nil || try == 3 || !strings.Contains(err.Error(), "server is busy") {
			return bps, loss, err
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func iperfOnce(c client, port int, secs int, args ...string) (bps, loss float64, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+5)*time.Second)
	defer cancel()
	full := append([]string{"-c", c.ip, "-p", strconv.Itoa(port), "-t", strconv.Itoa(secs), "-J", "--connect-timeout", "5000"}, args...)
	out, err := c.command(ctx, "iperf3", full...).Output()
	var r iperfResult
	if jerr := json.Unmarshal(out, &r); jerr != nil {
		return 0, 0, fmt.Errorf("iperf3 %v: %v (output not JSON: %v)", full, err, jerr)
	}
	if r.Error != "" {
		return 0, 0, fmt.Errorf("iperf3 %v: %s", full, r.Error)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("iperf3 %v: %w", full, err)
	}
	return r.End.SumReceived.BitsPerSecond, r.End.SumReceived.LostPercent, nil
}

// latencies collects per-exchange times from many goroutines.
type latencies struct {
	mu  sync.Mutex
	all []time.Duration
}

func (l *latencies) add(part []time.Duration) {
	l.mu.Lock()
	l.all = append(l.all, part...)
	l.mu.Unlock()
}

// percentile returns the p-th percentile (0-100) in microseconds.
func (l *latencies) percentile(p float64) float64 {
	if len(l.all) == 0 {
		return 0
	}
	sort.Slice(l.all, func(i, j int) bool { return l.all[i] < l.all[j] })
	i := int(float64(len(l.all)-1) * p / 100)
	return float64(l.all[i].Nanoseconds()) / 1000
}

// shortConns runs `clients` loops of connect, request, reply, close for d and
// returns connections per second and the latency of whole exchanges.
func shortConns(c client, port, clients int, d time.Duration) (perSec float64, lat *latencies, err error) {
	lat = &latencies{}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var done, failed int
	var firstErr error
	deadline := time.Now().Add(d)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			leave, err := c.enter()
			if err != nil {
				mu.Lock()
				firstErr = err
				mu.Unlock()
				return
			}
			defer leave()
			var mine []time.Duration
			okN, badN := 0, 0
			var lastErr error
			req, resp := make([]byte, msgSize), make([]byte, msgSize)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := exchange(c.addr(port), req, resp, 5*time.Second); err != nil {
					badN++
					lastErr = err
					time.Sleep(time.Millisecond)
					continue
				}
				mine = append(mine, time.Since(t0))
				okN++
			}
			lat.add(mine)
			mu.Lock()
			done += okN
			failed += badN
			if lastErr != nil && firstErr == nil {
				firstErr = lastErr
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	// A forwarder that drops under 1% of connections still gets its figure.
	if firstErr != nil && (done == 0 || failed*100 > done+failed) {
		return 0, nil, fmt.Errorf("%d of %d connections failed, e.g.: %w", failed, done+failed, firstErr)
	}
	return float64(done) / d.Seconds(), lat, nil
}

func exchange(addr string, req, resp []byte, timeout time.Duration) error {
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(req); err != nil {
		return err
	}
	_, err = io.ReadFull(conn, resp)
	return err
}

// udpRR sends one datagram and waits for its echo, again and again for d.
func udpRR(c client, port int, d time.Duration) (lat *latencies, lost int, err error) {
	lat = &latencies{}
	errc := make(chan error, 1)
	go func() {
		leave, err := c.enter()
		if err != nil {
			errc <- err
			return
		}
		defer leave()
		conn, err := net.Dial("udp", c.addr(port))
		if err != nil {
			errc <- err
			return
		}
		defer conn.Close()
		buf := make([]byte, msgSize)
		var mine []time.Duration
		deadline := time.Now().Add(d)
		for time.Now().Before(deadline) {
			t0 := time.Now()
			_ = conn.SetDeadline(t0.Add(200 * time.Millisecond))
			if _, err := conn.Write(buf); err != nil {
				errc <- err
				return
			}
			if _, err := conn.Read(buf); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					lost++
					continue
				}
				// ECONNREFUSED while a forwarder is still binding: count it as lost.
				lost++
				time.Sleep(time.Millisecond)
				continue
			}
			mine = append(mine, time.Since(t0))
		}
		lat.add(mine)
		errc <- nil
	}()
	if err := <-errc; err != nil {
		return nil, 0, err
	}
	if len(lat.all) == 0 {
		return nil, lost, fmt.Errorf("no UDP reply through port %d (%d lost)", port, lost)
	}
	return lat, lost, nil
}

// openIdle opens n connections through port, each with one exchange done (so
// the forwarder has its child-side connection too), and leaves them open.
func openIdle(c client, port, n int) (closeAll func(), err error) {
	conns := make([]net.Conn, 0, n)
	closeAll = func() {
		for _, conn := range conns {
			conn.Close()
		}
	}
	errc := make(chan error, 1)
	go func() {
		leave, err := c.enter()
		if err != nil {
			errc <- err
			return
		}
		defer leave()
		buf := make([]byte, msgSize)
		for i := 0; i < n; i++ {
			conn, err := net.DialTimeout("tcp", c.addr(port), 5*time.Second)
			if err != nil {
				errc <- fmt.Errorf("idle connection %d of %d: %w", i+1, n, err)
				return
			}
			conns = append(conns, conn)
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			_, err = conn.Write(buf)
			if err == nil {
				_, err = io.ReadFull(conn, buf)
			}
			if err != nil {
				errc <- fmt.Errorf("idle connection %d of %d: %w", i+1, n, err)
				return
			}
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		closeAll()
		return nil, err
	}
	return closeAll, nil
}
