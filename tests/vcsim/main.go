// vcsim for smsblock's tests: VMware's vCenter simulator (govmomi's simulator package,
// Debian's golang-github-vmware-govmomi-dev 0.24) with a VPX model, served on a chosen
// 127.0.0.1 port over http or TLS.
//
// It prints one JSON line on stdout when ready:
//
//	{"url": "http://127.0.0.1:PORT/sdk", "datastores": {"LocalDS_0": "/dir"}, "cert": "/file.pem"}
//
// "datastores" maps each datastore name to the local directory that backs it (under
// -datastore-root), so tests can drop real VMDKs in place of vcsim's empty placeholder
// disks. "cert" is the PEM of the TLS certificate (empty without -tls). The simulator runs
// until it gets SIGINT/SIGTERM (or, with -stdin-lifeline, stdin closes), then removes its datastore directories.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (host:port; port 0 picks a free one)")
	useTLS := flag.Bool("tls", false, "serve https (a self-signed certificate for 127.0.0.1, ::1 and example.com)")
	cert := flag.String("cert", "", "PEM certificate to serve with -tls instead of the built-in one")
	key := flag.String("key", "", "PEM private key of -cert")
	username := flag.String("username", "user", "the only username accepted")
	password := flag.String("password", "pass", "the only password accepted")
	root := flag.String("datastore-root", "", "directory under which the datastores' folders are created")
	lifeline := flag.Bool("stdin-lifeline", false, "also stop when stdin closes (the parent died)")
	flag.Parse()

	if *root != "" {
		// The 0.24 model puts each datastore in ioutil.TempDir("", ...): point that at root.
		if err := os.MkdirAll(*root, 0o755); err != nil {
			fail("datastore root: %v", err)
		}
		os.Setenv("TMPDIR", *root)
	}

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		fail("model: %v", err)
	}
	defer model.Remove()

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	if *useTLS {
		config := new(tls.Config)
		if *cert != "" {
			pair, err := tls.LoadX509KeyPair(*cert, *key)
			if err != nil {
				fail("certificate: %v", err)
			}
			config.Certificates = []tls.Certificate{pair}
		}
		model.Service.TLS = config
	}
	server := model.Service.NewServer()
	defer server.Close()

	certFile := ""
	if *useTLS {
		f, err := server.CertificateFile()
		if err != nil {
			fail("certificate file: %v", err)
		}
		certFile = f
	}

	datastores := map[string]string{}
	for _, obj := range simulator.Map.All("Datastore") {
		ds := obj.(*simulator.Datastore)
		datastores[ds.Name] = ds.Info.GetDatastoreInfo().Url
	}

	u := *server.URL
	u.User = nil
	ready, _ := json.Marshal(map[string]interface{}{
		"url": u.String(), "datastores": datastores, "cert": certFile,
	})
	fmt.Println(string(ready))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	if *lifeline {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			stop <- syscall.SIGTERM
		}()
	}
	<-stop
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "vcsim: "+format+"\n", args...)
	os.Exit(1)
}
