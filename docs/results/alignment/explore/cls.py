import sys, pickle
from pathlib import Path
import numpy as np, cv2
sys.argv=['x']
import detection as D
from ferkit.faces import crop_box, crop_face
from ferkit.predict import EmotionRecognizer
from ferkit.inference import adjusted_logits
rec = EmotionRecognizer()
scenes = D.scene_photos(Path('/work/shared/data/fer2013'), 900)
res = pickle.load(open('/tmp/align/frames.pkl','rb'))
def rot_crop(gray, square, angle):
    x, y, s, _ = square; cx, cy = x + s/2, y + s/2
    M = cv2.getRotationMatrix2D((cx, cy), angle, 1.0); M[:, 2] += (s/2 - cx, s/2 - cy)
    region = cv2.warpAffine(gray, M, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.resize(region, (48, 48), interpolation=cv2.INTER_AREA) if s > 48 else cv2.resize(region, (48,48))
TURNS = (-30, -22.5, -15, -7.5, 0, 7.5, 15, 22.5, 30)
out = {}
for kind in ('upright', 'tilted'):
    crops, meta = [], []
    for sc, item in zip(scenes, res):
        gray = cv2.cvtColor(sc[kind], cv2.COLOR_RGB2GRAY)
        dets = item[kind][0]
        m, _ = D.matched([d['box'] for d in dets], sc['centres'][kind], sc['sides'])
        for i, j in enumerate(m):
            if j < 0: continue
            sq = crop_box(dets[j]['box'], 0.9)
            for t in TURNS: crops.append(rot_crop(gray, sq, t))
            crops.append(crop_face(gray, sq))
            meta.append((sc['labels'][i], dets[j]['r'], 0 if kind == 'upright' else sc['angle']))
    z = adjusted_logits(rec.logits(np.stack(crops)), rec.meta.preprocessing, 'uniform').reshape(len(meta), len(TURNS) + 1, -1)
    out[kind] = (z, np.array(meta))
pickle.dump(out, open('/tmp/align/cls.pkl', 'wb'))
