import pickle, numpy as np
out = pickle.load(open('/tmp/align/cls.pkl','rb'))
TURNS = np.array((-30, -22.5, -15, -7.5, 0, 7.5, 15, 22.5, 30))
def sm(z): e = np.exp(z - z.max(-1, keepdims=True)); return e / e.sum(-1, keepdims=True)
for kind, (z, meta) in out.items():
    y, r, ang = meta[:, 0].astype(int), meta[:, 1], meta[:, 2]
    n = len(y)
    acc = lambda pred: round(100 * (pred == y).mean(), 2)
    print(kind, n, 'plain crop', acc(z[:, -1].argmax(-1)), 'rot0', acc(z[:, 4].argmax(-1)))
    # oracle: the turn nearest the true undo angle: undo = roll... tilt CCW by ang -> turn by -ang
    k = np.abs(TURNS[None] - (-ang[:, None])).argmin(1)
    print('  oracle turn', acc(z[np.arange(n), k].argmax(-1)))
    s = np.sign(r)  # roll sign = direction to turn
    for T in (1, 2, 3, 5):
        for name, turns in (('s15', [15]), ('s7.5,s15', [7.5, 15]), ('s15,s30', [15, 30]), ('0,s15', [0, 15]), ('0,s15,s30', [0, 15, 30]), ('0,s7.5,s15,s22.5', [0, 7.5, 15, 22.5])):
            pred = z[:, -1].argmax(-1).copy()
            trig = np.abs(r) >= T
            idx = [[int(np.where(TURNS == si * t)[0][0]) for t in turns] for si in s]
            ens = np.stack([sm(z[i, idx[i]]).mean(0) for i in range(n)])
            pred[trig] = ens[trig].argmax(-1)
            print(f'  T{T} {name}: acc {acc(pred)} triggered {trig.sum()}')
    allr = sm(z[:, :9]).mean(1)
    print('  all 9 turns ens', acc(allr.argmax(-1)), '0,+-15 ens', acc(sm(z[:, [2,4,6]]).mean(1).argmax(-1)), '+-7.5,0', acc(sm(z[:, [3,4,5]]).mean(1).argmax(-1)))
print('=== gain')
for kind, (z, meta) in out.items():
    y, r = meta[:, 0].astype(int), meta[:, 1]
    n = len(y)
    for T in (0, 1, 2, 3):
        line = []
        for g in (1, 2, 3, 4, 5, 6):
            turn = np.clip(g * r, -30, 30) * (np.abs(r) >= T)
            k = np.abs(TURNS[None] - turn[:, None]).argmin(1)
            pred = z[np.arange(n), k].argmax(-1)
            line.append(f'g{g} {100*(pred==y).mean():.2f}')
        print(kind, 'T', T, ' '.join(line))
