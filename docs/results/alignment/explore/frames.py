import sys, pickle
from pathlib import Path
import numpy as np, cv2
sys.argv=['x']
import detection as D
from ferkit.faces import YuNetDetector, _mapped
det = YuNetDetector()
scenes = D.scene_photos(Path('/work/shared/data/fer2013'), 900)
FR = (-30, -15, 0, 15, 30)
def frame(image, angle):
    h, w = image.shape[:2]
    turn = cv2.getRotationMatrix2D((w/2, h/2), angle, 1.0)
    cos, sin = abs(turn[0,0]), abs(turn[0,1])
    size = (round(w*cos+h*sin), round(w*sin+h*cos))
    turn[:,2] += (size[0]-w)/2, (size[1]-h)/2
    turned = cv2.warpAffine(image, turn, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    back = cv2.invertAffineTransform(turn)
    out = []
    for d in det.detect(turned):
        x,y,bw,bh = d.box
        c = _mapped(back, [(x+bw/2, y+bh/2)])[0]
        p = np.array(d.landmarks); r = np.degrees(np.arctan2(p[1,1]-p[0,1], p[1,0]-p[0,0]))
        out.append(dict(c=c, r=r, score=d.score, side=max(bw,bh), box=d.box))
    return out
res = []
for sc in scenes:
    item = {'angle': sc['angle'], 'sides': sc['sides'], 'centres': sc['centres']}
    for kind in ('upright', 'tilted'):
        item[kind] = {b: frame(sc[kind], b) for b in FR}
    res.append(item)
pickle.dump(res, open('/tmp/align/frames.pkl', 'wb'))
