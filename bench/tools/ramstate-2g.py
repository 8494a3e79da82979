# One-off raw-QMP measurement behind docs/performance.md "RAM state: mapped-ram vs stream": a stopped
# 2 GiB guest whose RAM is random (memory-backend-file share=off over a random file), saved and restored as a
# stream (unix socket -> file, fsync) and, on a QEMU with mapped-ram, as a mapped-ram+multifd file:, against dd conv=fsync.
# Not a bench case (no qmpd, no baseline pairing). Usage: python3 bench/tools/ramstate-2g.py QEMU_BINARY WORKDIR [REPS]
import json, socket, subprocess, time, os, sys, threading
B=sys.argv[1]; W=sys.argv[2]; os.makedirs(W, exist_ok=True); os.chdir(W)
SZ=2048
env=dict(os.environ)
if 'q10' in B: env['QEMU_MODULE_DIR']='/tmp/q10/root/usr/lib/x86_64-linux-gnu/qemu'
extra=['-L','/tmp/q10/root/usr/share/qemu'] if 'q10' in B else []
if not os.path.exists('rand.bin'):
    subprocess.run(['dd','if=/dev/urandom','of=rand.bin','bs=1M',f'count={SZ}','status=none'],check=True)
def qmp(path):
    s=socket.socket(socket.AF_UNIX)
    for i in range(200):
        try: s.connect(path); break
        except Exception: time.sleep(0.05)
    f=s.makefile('rw'); f.readline()
    def cmd(c,a=None):
        f.write(json.dumps({'execute':c,**({'arguments':a} if a else {})})+'\n'); f.flush()
        while True:
            r=json.loads(f.readline())
            if 'event' in r: continue
            if 'error' in r: raise Exception(r)
            return r['return']
    cmd('qmp_capabilities'); return cmd
def launch(incoming=None):
    for f in ('q.sock',):
        if os.path.exists(f): os.remove(f)
    a=[B,*extra,'-machine','q35,memory-backend=m0','-accel','tcg','-m',f'{SZ}M','-nodefaults','-display','none','-S',
       '-object',f'memory-backend-file,id=m0,size={SZ}M,mem-path=rand.bin,share=off','-qmp','unix:q.sock,server=on,wait=off']
    if incoming: a+=['-incoming',incoming]
    p=subprocess.Popen(a,env=env); return p, qmp('q.sock')
def wait(c):
    while True:
        r=c('query-migrate')
        if r.get('status') in ('completed','failed','cancelled'):
            if r['status']!='completed': raise Exception(r)
            return
        time.sleep(0.005)
def fsync(path):
    fd=os.open(path,os.O_RDONLY); os.fsync(fd); os.close(fd)
def rm(*fs):
    for f in fs:
        if os.path.exists(f): os.remove(f)
res={}
def dd():
    rm('dd.out'); t=time.time()
    subprocess.run(['dd','if=rand.bin','of=dd.out','bs=4M','conv=fsync','status=none'],check=True)
    return time.time()-t
def save(mode):
    rm('s.'+mode)
    p,c=launch(); 
    # touch all pages once so RAM is populated from the file (as a running guest's would be)
    c('migrate-set-parameters',{'max-bandwidth':2**40})
    if mode=='mapped':
        c('migrate-set-capabilities',{'capabilities':[{'capability':'mapped-ram','state':True},{'capability':'multifd','state':True}]})
        c('migrate-set-parameters',{'multifd-channels':2,'direct-io':True})
        t=time.time(); c('migrate',{'uri':'file:'+os.path.abspath('s.mapped')}); wait(c); fsync('s.mapped'); d=time.time()-t
    else:
        rm('feed.sock')
        srv=socket.socket(socket.AF_UNIX); srv.bind('feed.sock'); srv.listen(1)
        out=open('s.stream','wb')
        def recv():
            conn,_=srv.accept()
            while True:
                b=conn.recv(1<<20)
                if not b: break
                out.write(b)
            out.flush(); os.fsync(out.fileno()); out.close()
        th=threading.Thread(target=recv); th.start()
        t=time.time(); c('migrate',{'uri':'unix:feed.sock'}); wait(c); th.join(); d=time.time()-t
        srv.close()
    c('quit'); p.wait(); return d
def restore(mode):
    if mode=='mapped':
        p,c=launch('defer')
        c('migrate-set-capabilities',{'capabilities':[{'capability':'mapped-ram','state':True},{'capability':'multifd','state':True}]})
        c('migrate-set-parameters',{'multifd-channels':2,'direct-io':True})
        t=time.time(); c('migrate-incoming',{'uri':'file:'+os.path.abspath('s.mapped')}); wait(c); d=time.time()-t
    else:
        p,c=launch('defer'); rm('in.sock')
        t=time.time(); c('migrate-incoming',{'uri':'unix:in.sock'})
        s=socket.socket(socket.AF_UNIX)
        for i in range(100):
            try: s.connect('in.sock'); break
            except Exception: time.sleep(0.002)
        with open('s.stream','rb') as f:
            while True:
                b=f.read(1<<20)
                if not b: break
                s.sendall(b)
        wait(c); d=time.time()-t; s.close()
    c('quit'); p.wait(); return d
modes=['stream']+(['mapped'] if 'q10' in B else [])
for rep in range(int(sys.argv[3]) if len(sys.argv)>3 else 2):
    r={'dd':dd()}
    for m in modes:
        r['save-'+m]=save(m)
        r['restore-'+m]=restore(m)
    print(json.dumps({k:round(v,3) for k,v in r.items()}), flush=True)
print('sizes', {f: os.path.getsize(f) for f in ('s.stream','s.mapped') if os.path.exists(f)})
